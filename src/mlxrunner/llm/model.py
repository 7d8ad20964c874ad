"""Text generation: Hugging Face config -> C++ decoder; prompt -> streamed text.

Python does what is not hot: reading config.json, tokenizing, turning token ids into valid UTF-8
text as they come (StreamingDetokenizer), holding back text that may start a stop string
(StopMatcher), and timing. The network, the KV cache, the prefill/decode loop and sampling run
in C++ (`_core.Decoder`, `_core.Generator`), which releases the GIL while it computes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Collection, Iterator

import numpy as np

from mlxrunner import _core
from mlxrunner.errors import ModelError
from mlxrunner.http.protocol import Options
from mlxrunner.store import QuantParams
from mlxrunner.text.chat_template import ChatTemplate, NoChatTemplate
from mlxrunner.text.detokenizer import StreamingDetokenizer
from mlxrunner.text.stop import StopMatcher
from mlxrunner.text.tokenizer import TextTokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
                 "Glm4MoeLiteForCausalLM": "glm4_moe_lite"}
# The expert count's spellings: the Hub's Qwen3-MoE configs, transformers 5's saves, DeepSeek / GLM.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
ROPE_TYPES = ("default", "linear", "llama3")
PREFILL_CHUNK = 512


def decoder_config(config: dict) -> _core.DecoderConfig:
    """transformers' LlamaConfig / Qwen3Config -> the C++ config, refusing what we do not run."""
    names = config.get("architectures") or []
    architecture = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if architecture is None:
        raise ModelError(f"unsupported LLM architecture {names or config.get('model_type')!r}; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    try:
        return _core.DecoderConfig.from_dict({**config, "architecture": architecture, "rope": rope_config(config),
                                              "moe": moe_config(config), "mla": nested(_core.MlaConfig, config)})
    except ValueError as exc:
        raise ModelError(f"config.json: {exc}") from None


def rope_config(config: dict) -> dict:
    """rope_theta and rope_parameters (transformers 5) or rope_scaling (4.x; its scaling type may be called
    "type") -> DecoderConfig's nested `rope`."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise ModelError(f"config.json: rope scaling must be an object, got {scaling!r}")
    rope = {**scaling, "rope_type": scaling.get("rope_type") or scaling.get("type")}
    if config.get("rope_theta") is not None:  # 4.x keeps the base beside rope_scaling
        rope["rope_theta"] = config["rope_theta"]
    kind = rope["rope_type"] or "default"
    if kind not in ROPE_TYPES:
        raise ModelError(f"config.json: rope scaling '{kind}' is not supported ({', '.join(ROPE_TYPES)})")
    if kind != "default" and scaling.get("factor") is None:
        raise ModelError(f"config.json: rope scaling '{kind}' needs a factor")
    return rope


def nested(config_class, config: dict) -> dict:
    """The keys of config.json that a nested C++ config (MoeConfig, MlaConfig) has: they sit at the top level."""
    return {key: config[key] for key in config_class().to_dict() if key in config}


def moe_config(config: dict) -> dict:
    """DecoderConfig's nested `moe`; the expert count under whichever name the config uses."""
    moe = nested(_core.MoeConfig, config)
    count = next((config[key] for key in NUM_EXPERTS_KEYS if config.get(key) is not None), None)
    if count is not None:
        moe["num_experts"] = count
    return moe


def core_quantization(params: dict[str, QuantParams]) -> dict[str, _core.QuantSpec]:
    """The store's parameters of each packed weight (already checked against MLX) -> what _core's networks
    take. Packed weights stay packed: the networks multiply them with MLX's quantized kernels."""
    return {name: _core.QuantSpec.from_dict(asdict(p)) for name, p in params.items()}


def sampler_options(options: Options, prompt_seed: int | None = None) -> _core.SamplerOptions:
    """Request options -> C++ sampler options. What the request leaves out (None) keeps the C++ default,
    Ollama's."""
    given = {name: getattr(options, name) for name in _core.SamplerOptions().to_dict()}
    seed = options.seed if options.seed is not None else prompt_seed
    # Ollama: a negative seed means unseeded.
    given["seed"] = seed % (1 << 64) if seed is not None and seed >= 0 else None
    return _core.SamplerOptions.from_dict(given)


@dataclass
class Completion:
    """What one generation did, for the final line of the stream."""

    done_reason: str = "length"  # stop | length | cancel
    stop_reason: str = "num_predict"  # eos:<id> | stop:<text> | num_predict | context
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns


@dataclass(frozen=True)
class TokenLogprob:
    """How likely the model found one generated token (natural log of its softmax over the raw logits, before
    penalties and temperature), and its most likely alternatives, best first."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]]


class PromptTooLong(ValueError):
    pass


def _chat_template(source) -> ChatTemplate | None:
    """The model's chat template, or None for a model that has none (a base model: plain prompts only)."""
    try:
        return ChatTemplate.from_folder(source)
    except NoChatTemplate:
        return None


class LanguageModel:
    """A loaded decoder LLM. Use from one thread at a time (the runner's MLX worker)."""

    def __init__(self, source, progress: Callable[[float], None] | None = None):
        config = source.read_json("config.json")
        self.config = config
        self.core_config = decoder_config(config)
        self.tokenizer = TextTokenizer.from_source(source)
        self.chat_template = _chat_template(source)
        self.context_length = int(config.get("max_position_embeddings") or 4096)
        quantization = core_quantization(source.quantization(""))
        weights = source.tensors("")
        if progress:
            progress(0.5)
        try:
            self.decoder = _core.Decoder(self.core_config, weights, quantization)
        except ValueError as exc:
            raise ModelError(f"{source.location}: {exc}") from None
        # The decoder keeps what it uses (q/k/v and gate/up fused into one layer each); dropping the
        # dict first lets eval_weights free each layer's separate checkpoint arrays once fused.
        del weights
        self.decoder.eval_weights()
        self.dims = self.core_config.hidden_size

    # --- text <-> ids ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as generation feeds it: BOS first iff the tokenizer adds one."""
        return self.tokenizer.encode(text, add_bos=True)

    def detokenize(self, ids: list[int]) -> str:
        bad = [i for i in ids if i >= self.core_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.core_config.vocab_size})")
        return self.tokenizer.decode(ids)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Float32 logits [T, vocab] for a prompt (parity checks)."""
        return np.array(self.decoder.logits(list(token_ids), PREFILL_CHUNK), copy=False)

    # --- generation -----------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids; PromptTooLong if it has none or does not fit the context. A text
        whose byte length alone shows it cannot fit is refused before it is tokenized."""
        if isinstance(prompt, str):
            self._refuse_by_byte_length(prompt)
        ids = list(prompt) if isinstance(prompt, list) else self.encode_prompt(prompt)
        if not ids:
            raise PromptTooLong("the prompt has no tokens")
        if len(ids) >= self.context_length:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; the model's context is {self.context_length}")
        return ids

    def _refuse_by_byte_length(self, prompt: str) -> None:
        most_bytes = self.context_length * self.tokenizer.max_token_bytes
        size = len(prompt.encode("utf-8", errors="surrogatepass"))
        if size > most_bytes:
            raise PromptTooLong(f"the prompt is {size} bytes; no more than {most_bytes} bytes can fit the "
                                f"model's context of {self.context_length} tokens")

    def stream(self, prompt: str | list[int], options: Options = Options(),
               check_cancelled: Callable[[], None] | None = None,
               stop_token_ids: Collection[int] = (), top_logprobs: int | None = None,
               ) -> Iterator[str | TokenLogprob | Completion]:
        """Yield text chunks (valid UTF-8, stop strings withheld), then one Completion.

        stop_token_ids: tokens that end the answer besides the tokenizer's EOS (a chat template's end of turn).
        top_logprobs: None, or k >= 0: each generated token's TokenLogprob (with k alternatives) is yielded
        before the text it makes.
        """
        eos_ids = self.tokenizer.eos_ids | frozenset(stop_token_ids)
        ids = self.prompt_ids(prompt)
        budget = self.context_length - len(ids)
        if options.num_predict is not None and options.num_predict >= 0:
            budget = min(budget, options.num_predict)
        result = Completion(prompt_eval_count=len(ids))
        detok = StreamingDetokenizer(self.tokenizer)
        stops = StopMatcher(options.stop)
        generator = _core.Generator(self.decoder, ids, sampler_options(options), PREFILL_CHUNK,
                                    -1 if top_logprobs is None else top_logprobs)
        start = time.perf_counter_ns()
        first_token_at = None
        try:
            for _ in range(budget):
                if check_cancelled:
                    check_cancelled()
                token = next(generator)
                if first_token_at is None:
                    first_token_at = time.perf_counter_ns()
                    result.prompt_eval_duration = first_token_at - start
                if token in eos_ids:
                    result.done_reason, result.stop_reason = "stop", f"eos:{token}"
                    break
                result.eval_count += 1
                if top_logprobs is not None:
                    yield self._token_logprob(token, generator.logprobs)
                emit, matched = stops.push(detok.add(token))
                if emit:
                    yield emit
                if matched is not None:
                    result.done_reason, result.stop_reason = "stop", f"stop:{matched}"
                    break
            else:
                result.stop_reason = "num_predict" if budget < self.context_length - len(ids) else "context"
            if not result.stop_reason.startswith("stop:"):
                # Bytes the detokenizer still held can complete a stop string too.
                emit, matched = stops.push(detok.flush())
                if matched is not None:
                    result.done_reason, result.stop_reason = "stop", f"stop:{matched}"
                tail = emit + ("" if matched is not None else stops.flush())
                if tail:
                    yield tail
        finally:
            if first_token_at is not None:
                result.eval_duration = time.perf_counter_ns() - first_token_at
        yield result

    def _token_logprob(self, token: int, logprobs: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        logprob, top = logprobs
        as_bytes = self.tokenizer.token_bytes
        return TokenLogprob(as_bytes(token), logprob, [(as_bytes(i), lp) for i, lp in top])

    def generate(self, prompt: str | list[int], **options) -> Iterator[str]:
        """Public API: iterate text chunks. Options as in a /completion request's `options`."""
        from mlxrunner.http.protocol import Limits, parse_options

        parsed = parse_options(options, Limits())
        for item in self.stream(prompt, parsed):
            if isinstance(item, str):
                yield item

    # --- embeddings (decoder models as embedders, e.g. Qwen3-Embedding) -------------------------

    def embed(self, texts: list[str], normalize: bool | None = None, truncate: bool = True,
              check_cancelled: Callable[[], None] | None = None):
        """Last-token pooling of the final layer's hidden state (Qwen3-Embedding's choice), L2-normalised
        unless normalize is False."""
        import mlx.core as mx

        from mlxrunner.embed.bert import EmbeddingResult, InputTooLong

        vectors, count, truncated = [], 0, []
        for index, text in enumerate(texts):
            if check_cancelled:
                check_cancelled()
            ids = self.tokenizer.encode(text, add_bos=True) or [self.tokenizer.eos_or_pad_id()]
            if len(ids) > self.context_length:
                if not truncate:
                    raise InputTooLong(f"input {index} has {len(ids)} tokens, more than the model's maximum of "
                                       f"{self.context_length} (send truncate: true to cut it)")
                ids = ids[: self.context_length]
                truncated.append(index)
            count += len(ids)
            layers = self.core_config.num_hidden_layers
            (hidden,) = self.decoder.hidden_states(mx.array([ids], mx.int32), None, [layers])
            last = hidden[0, -1].astype(mx.float32)
            vectors.append(np.array(last))
        out = np.stack(vectors)
        if normalize is not False:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return EmbeddingResult(out, count, truncated)

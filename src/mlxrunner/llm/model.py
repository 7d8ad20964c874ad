"""Text generation: Hugging Face config -> C++ decoder; prompt -> streamed text.

Python does what is not hot: reading config.json, tokenizing, turning token ids into valid UTF-8
text as they come (StreamingDetokenizer), holding back text that may start a stop string
(StopMatcher), and timing. The network, the KV cache, the prefill/decode loop and sampling run
in C++ (`_core.Decoder`, `_core.Generator`), which releases the GIL while it computes. Each request starts
from the prompt cache's closest earlier sequence (llm/prompt_cache.py) and hands its own caches back to it.
Requests that the worker runs side by side decode together in one batch (llm/batch.py).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict
from typing import Callable, Collection, Iterator

import mlx.core as mx
import numpy as np

from mlxrunner import _core, backend
from mlxrunner.errors import Cancelled, ModelError, RequestError
from mlxrunner.llm.answer import Answer, Completion, TokenLogprob
from mlxrunner.llm.architectures import decoder_config, text_config, text_weights
from mlxrunner.llm.batch import BatchScheduler
from mlxrunner.llm.prompt_cache import PromptCache
from mlxrunner.request import Options
from mlxrunner.settings import DEFAULT_MAX_BATCH, DEFAULT_PROMPT_CACHE_BYTES
from mlxrunner.store import QuantParams
from mlxrunner.text.chat_template import ChatTemplate, NoChatTemplate
from mlxrunner.text.json_schema import CompiledSchema
from mlxrunner.text.tokenizer import TextTokenizer

PREFILL_CHUNK = 512
# MLX's buffer cache on a GPU, at most. MLX's own bound is its memory limit (95 % of the device), which a serving LLM
# reaches from buffers of sizes that never come back (a batch's key/value buffers at each batch size it passes
# through, a sequence's as they grow). A full device then has the driver move managed memory, where MLX keeps the
# weights, to the host: on an H100 80GB, 64 concurrent streams of a 4B model ran at 0.75 s a step instead of 10 ms
# (benchmarks/README.md, session 34; with the batch's regroup alone its cache still reached 14.5 GB in four rounds).
# What a decode step and a prefill chunk free and take again fits here.
GPU_CACHE_BYTES = 1 << 30

log = logging.getLogger(__name__)


def core_quantization(params: dict[str, QuantParams]) -> dict[str, _core.QuantSpec]:
    """The store's parameters of each packed weight (already checked against MLX) -> what _core's networks
    take. Packed weights stay packed: the networks multiply them with MLX's quantized kernels."""
    return {name: _core.QuantSpec.from_dict(asdict(p)) for name, p in params.items()}


def _sequence(prompt_tokens: np.ndarray, generated: list[int]) -> np.ndarray:
    """A finished sequence's tokens as the prompt cache keeps them: the prompt, then what was generated."""
    return np.concatenate((prompt_tokens, np.asarray(generated, np.int32)))


def sampler_options(options: Options, prompt_seed: int | None = None) -> _core.SamplerOptions:
    """Request options -> C++ sampler options. What the request leaves out (None) keeps the C++ default,
    Ollama's."""
    given = {name: getattr(options, name) for name in _core.SamplerOptions().to_dict()}
    seed = options.seed if options.seed is not None else prompt_seed
    # Ollama: a negative seed means unseeded.
    given["seed"] = seed % (1 << 64) if seed is not None and seed >= 0 else None
    return _core.SamplerOptions.from_dict(given)


def core_schema(schema: CompiledSchema) -> _core.JsonSchema:
    """text/json_schema.py's nodes as the C++ recogniser's (which checks them again)."""
    nodes = []
    for node in schema.nodes:
        core = _core.SchemaNode()
        for name in ("kinds", "literal_kinds", "literals", "keys", "key_nodes", "required", "additional", "items",
                     "min_length", "max_length", "min_items", "max_items"):
            setattr(core, name, getattr(node, name))
        nodes.append(core)
    return _core.JsonSchema(nodes, schema.root)


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

    def __init__(self, source, progress: Callable[[float], None] | None = None,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, max_batch: int | None = None):
        config = source.read_json("config.json")
        self.config = config
        self.core_config = decoder_config(config)
        self.tokenizer = TextTokenizer.from_source(source)
        self.chat_template = _chat_template(source)
        self.context_length = int(text_config(config).get("max_position_embeddings") or 4096)
        quantization = core_quantization(text_weights(config, source.quantization("")))
        weights = text_weights(config, source.tensors(""))
        if quantization:
            # On the CPU a quantized LLM computes in float32 (its scales, biases and few float tensors upcast, ~11 %
            # more memory at 4 bits): MLX's half-precision products there run one term at a time on one thread,
            # the float32 ones on our multi-core kernel (nn/cpu_kernels.h), ~10x faster a token. A float LLM keeps
            # its stored dtype: upcasting it would double its memory.
            weights = backend.compute_weights(weights)
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
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.batch = self._batch_scheduler(max_batch)
        if mx.default_device() == mx.gpu:
            backend.lower_cache_limit(GPU_CACHE_BYTES)
            self._warm_up_gpu_kernels()

    def _batch_scheduler(self, max_batch: int | None) -> BatchScheduler | None:
        """Requests decode together (llm/batch.py) unless max_batch is 1 or the model cannot batch (None: the
        backend's default)."""
        if max_batch is None:
            max_batch = DEFAULT_MAX_BATCH["cpu" if mx.default_device() == mx.cpu else "gpu"]
        if max_batch <= 1:
            return None
        if not self.decoder.can_batch:
            log.info("this model has latent attention or attention-sink layers, which do not batch: its requests run "
                     "one at a time")
            return None
        return BatchScheduler(self.decoder, self.prompt_cache, max_batch, PREFILL_CHUNK)

    def _warm_up_gpu_kernels(self) -> None:
        """Run each kernel shape generation uses once, so the first request does not pay for loading them.

        On CUDA the first call of each quantized-matmul and attention kernel variant costs seconds (tens of
        seconds for a quantized model on a fresh machine): the driver loads and compiles the kernels it has
        not seen. Which variant runs depends on the rows in flight: one token (decode); each count from 1 to
        _core.MATVEC_MAX_ROWS (a short prompt, or a prompt cache hit's few remaining tokens: our decode kernel takes
        them, in one variant up to 8 rows, beside MLX's kernels of those shapes); a prompt's remainder and a full
        prefill chunk. Each of those shapes is run here (a prompt of n tokens, up to a chunk, runs as one forward of
        n rows); and the batched decode steps (BatchScheduler).
        """
        started = time.perf_counter()
        greedy = sampler_options(Options(temperature=0.0, repeat_penalty=1.0))
        longest = min(PREFILL_CHUNK + 1, self.context_length - 2)
        lengths = {*range(2, _core.MATVEC_MAX_ROWS + 3), 64, PREFILL_CHUNK + 1}
        for length in sorted({min(n, longest) for n in lengths}):
            generator = _core.Generator(self.decoder, [0] * length, greedy, PREFILL_CHUNK, -1)
            next(generator)
            next(generator)
            del generator
        if self.batch is not None:
            self.batch.warm_up()
        mx.synchronize()
        log.info("warmed up the GPU kernels in %.2fs", time.perf_counter() - started)

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
               stop_token_ids: Collection[int] = (), top_logprobs: int | None = None, json_output: bool = False,
               json_schema: CompiledSchema | None = None) -> Iterator[str | TokenLogprob | Completion]:
        """Yield text chunks (valid UTF-8, stop strings withheld), then one Completion.

        stop_token_ids: tokens that end the answer besides the tokenizer's EOS (a chat template's end of turn).
        top_logprobs: None, or k >= 0: each generated token's TokenLogprob (with k alternatives) is yielded
        before the text it makes.
        json_output: the answer is one JSON object, and ends with it (stop reason "json"); json_schema (from
        text/json_schema.py): one that schema allows. Such a request runs alone, never in a batch (the server gives
        it a job of its own: http/server.py).
        """
        json_output = json_output or json_schema is not None
        eos_ids = self.tokenizer.eos_ids | frozenset(stop_token_ids)
        answer = Answer(self.tokenizer, self.context_length, self.prompt_ids(prompt), options, eos_ids, top_logprobs)
        logit_bias = self._logit_bias(options.logit_bias)
        if self.batch is not None and self.batch.serves_this_thread() and not json_output:
            yield from self.batch.stream(answer, sampler_options(options), check_cancelled, logit_bias)
            return
        ids = answer.ids
        # The prompt as the prompt cache compares it, converted once: for a long prompt each conversion of the list
        # costs tens of microseconds, a share of a cached follow-up's few milliseconds.
        prompt_tokens = np.asarray(ids, np.int32)
        cached, answer.result.prompt_cache_count = self.prompt_cache.fetch(prompt_tokens)
        try:
            generator = _core.Generator(self.decoder, ids, sampler_options(options), PREFILL_CHUNK,
                                        -1 if top_logprobs is None else top_logprobs, cached, answer.budget,
                                        self.json_vocabulary if json_output else None,
                                        core_schema(json_schema) if json_schema is not None else None, logit_bias)
        except Exception:
            self.prompt_cache.take_back(ids, cached)
            raise
        # The generator took the caches (`cached` is left empty): a second holder would stop the CUDA kernels
        # writing a handed-over sequence's next positions in place, and make MLX copy each buffer at its first write.
        try:
            # The prefill, a chunk per call so that a cancel lands between chunks, up to the last chunk: the first
            # next() runs that with the last token in one forward.
            while generator.prompt_left > PREFILL_CHUNK:
                if check_cancelled:
                    check_cancelled()
                generator.prefill_chunk()
            while not answer.done:
                if check_cancelled:
                    check_cancelled()
                token = next(generator)
                yield from answer.push(token, generator.logprobs, generator.json_complete)
        except Cancelled:
            # What was computed before the cancel stays reusable: the same request sent again resumes from it.
            self.prompt_cache.keep(_sequence(prompt_tokens, answer.generated), generator.position,
                                   generator.take_cache())
            raise
        except GeneratorExit:
            # The consumer dropped the stream: perhaps on another thread (the garbage collector's), where the prompt
            # cache may not be touched, so the sequence goes back through its queue. It may hold the sequence this
            # request took from the cache: dropped with the stream, a conversation would lose it.
            held = generator.position
            self.prompt_cache.give_back(_sequence(prompt_tokens, answer.generated)[:held], generator.take_cache())
            raise
        self.prompt_cache.keep(_sequence(prompt_tokens, answer.generated), generator.position, generator.take_cache())
        yield from answer.finish()

    def _logit_bias(self, biases: dict[int, float] | None) -> mx.array | None:
        """OpenAI's logit_bias as the [V] array every draw adds; a RequestError naming it for an id the model does not
        have."""
        if not biases:
            return None
        vocab_size = self.core_config.vocab_size
        dense = np.zeros(vocab_size, np.float32)
        for token, bias in biases.items():
            if not 0 <= token < vocab_size:
                raise RequestError(f'field "logit_bias": token id {token} is outside the vocabulary ({vocab_size} '
                                   "tokens)", field="logit_bias")
            dense[token] = bias
        return mx.array(dense)

    @functools.cached_property
    def json_vocabulary(self) -> _core.TokenVocabulary:
        """The tokens as bytes, for answers held to JSON: built at the first such request (~0.5 s for a
        150,000-token vocabulary)."""
        return _core.TokenVocabulary(*self.tokenizer.token_table())

    def generate(self, prompt: str | list[int], **options) -> Iterator[str]:
        """Public API: iterate text chunks. Options as in a /completion request's `options`."""
        from mlxrunner.request import Limits, parse_options

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

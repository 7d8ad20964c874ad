"""The image pipelines' text encoder: Qwen3 (C++ `_core.Decoder`) plus its tokenizer.

Both Z-Image and FLUX.2 Klein condition on Qwen3 hidden states of a chat-templated prompt; what
differs is the template, the maximum length and which layers they take, so those are arguments.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxrunner import _core, backend
from mlxrunner.errors import ModelError
from mlxrunner.llm.architectures import decoder_config
from mlxrunner.llm.model import core_quantization

log = logging.getLogger(__name__)


class Qwen3TextEncoder:
    def __init__(self, source, component: str = "text_encoder", tokenizer_component: str = "tokenizer"):
        self.source = source
        self.component = component
        config_path = f"{component}/config.json"
        if not source.has_file(config_path):
            raise ModelError(f"{source.location}: the pipeline has no {config_path}")
        config = dict(source.read_json(config_path))
        # Pipelines ship either Qwen3ForCausalLM or the bare Qwen3Model (Z-Image's real folder);
        # both are the same network for hidden states.
        if config.get("architectures") in (["Qwen3Model"], None) and config.get("model_type") == "qwen3":
            config["architectures"] = ["Qwen3ForCausalLM"]
        self.config = decoder_config(config)
        # The LM head is never used for hidden states: tying makes the decoder skip loading it.
        self.config.tie_word_embeddings = True
        tokenizer_path = f"{tokenizer_component}/tokenizer.json"
        if not source.has_file(tokenizer_path):
            raise ModelError(f"{source.location}: the pipeline has no {tokenizer_path}")
        try:
            self.tokenizer = Tokenizer.from_file(str(source.file_path(tokenizer_path)))
        except Exception as exc:  # tokenizers raises plain Exception for a malformed file
            raise ModelError(f"{source.location}: cannot read {tokenizer_path}: {exc}") from None
        self._decoder: _core.Decoder | None = None
        self.load()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def load(self) -> None:
        """Build the network from the (mmap'd) weights; a no-op when it is loaded."""
        if self._decoder is not None:
            return
        weights = backend.compute_weights(self.source.tensors(self.component))
        quantization = core_quantization(self.source.quantization(self.component))
        if "embed_tokens.weight" in weights:  # a bare Qwen3Model: names lack the "model." prefix
            weights = {f"model.{name}": value for name, value in weights.items()}
            quantization = {f"model.{name}": spec for name, spec in quantization.items()}
        try:
            self._decoder = _core.Decoder(self.config, weights, quantization)
        except ValueError as exc:
            raise ModelError(f"{self.source.location}: {self.component}: {exc}") from None
        del weights  # see LanguageModel: the fused projections then hold the only references
        self._decoder.eval_weights()

    def release(self) -> None:
        """Drop the network's arrays (small-memory machines); the next encode loads it again."""
        self._decoder = None
        mx.clear_cache()

    def tokenize(self, text: str, max_length: int) -> tuple[list[int], bool]:
        """Token ids of already-templated text, cut to max_length (right truncation, as the
        pipelines' tokenizer call does); and whether it was cut."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return ids[:max_length], len(ids) > max_length

    def hidden_states(self, ids: list[int], layers: list[int]) -> list[mx.array]:
        """transformers' hidden_states[i] for each i in `layers` (0 = embeddings, i = after i layers),
        each [T, hidden]. One unpadded prompt: with right padding and causal attention, the real
        tokens' states do not depend on the pads, so none are added."""
        self.load()
        tokens = mx.array(np.asarray([ids], dtype=np.int32))
        return [h[0] for h in self._decoder.hidden_states(tokens, None, layers)]

    def padded_hidden_states(self, ids: list[int], length: int, pad_id: int, layers: list[int]) -> list[mx.array]:
        """hidden_states[i] for each i in `layers`, each [length, hidden], of `ids` right-padded to
        `length` with `pad_id`, the pads' states included (FLUX.2 feeds all of them on). As
        transformers with an attention mask: causal attention where pad keys are masked, every
        position (pads too) computed."""
        if len(ids) > length:
            raise ValueError(f"{len(ids)} tokens do not fit in {length}")
        self.load()
        padded = np.full((1, length), pad_id, dtype=np.int32)
        padded[0, :len(ids)] = ids
        mask = np.zeros((1, length), dtype=np.int32)
        mask[0, :len(ids)] = 1
        return [h[0] for h in self._decoder.hidden_states(mx.array(padded), mx.array(mask), layers)]

    def token_id(self, token: str) -> int | None:
        """The id of a (special) token, or None when the vocabulary lacks it."""
        return self.tokenizer.token_to_id(token)

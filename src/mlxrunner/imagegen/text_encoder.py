"""The image pipelines' text encoder: Qwen3 (C++ `_core.Decoder`) plus its tokenizer.

Both Z-Image and FLUX.2 Klein condition on Qwen3 hidden states of a chat-templated prompt; what
differs is the template, the maximum length and which layers they take, so those are arguments.

Only the layers up to the deepest hidden state a pipeline reads are loaded: FLUX.2 Klein reads
hidden_states[27] of a 36-layer Qwen3-4B, so its last 9 layers (1.8 GB in bf16) would be weights
that no request ever computes; Z-Image reads hidden_states[-2], the last layer is never run.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxrunner import _core, backend
from mlxrunner.errors import ModelError
from mlxrunner.llm.architectures import decoder_config
from mlxrunner.llm.model import core_quantization

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# config.json's per-layer lists, which must name as many layers as the decoder is built with.
_PER_LAYER_KEYS = ("layer_types", "mlp_layer_types")


def read_config(source, component: str = "text_encoder") -> dict:
    """The text encoder's config.json, as a Qwen3ForCausalLM's."""
    config_path = f"{component}/config.json"
    if not source.has_file(config_path):
        raise ModelError(f"{source.location}: the pipeline has no {config_path}")
    config = dict(source.read_json(config_path))
    # Pipelines ship either Qwen3ForCausalLM or the bare Qwen3Model (Z-Image's real folder);
    # both are the same network for hidden states.
    if config.get("architectures") in (["Qwen3Model"], None) and config.get("model_type") == "qwen3":
        config["architectures"] = ["Qwen3ForCausalLM"]
    return config


def resolved_indices(hidden_states: Sequence[int], num_layers: int) -> list[int]:
    """transformers' hidden_states indices (negative from the end of its num_layers + 1 states) as 0..num_layers."""
    resolved = [i if i >= 0 else num_layers + 1 + i for i in hidden_states]
    if not resolved or min(resolved) < 0 or max(resolved) > num_layers:
        raise ValueError(f"the text encoder has {num_layers} layers; the pipeline reads its hidden states "
                         f"{list(hidden_states)}")
    return resolved


def layers_read(hidden_states: Sequence[int], num_layers: int) -> int:
    """How many of the checkpoint's layers computing `hidden_states` runs (at least one: a decoder has layers)."""
    return max(1, *resolved_indices(hidden_states, num_layers))


def in_kept_layers(name: str, kept_layers: int) -> bool:
    """Whether a tensor (or quantization entry) is loaded: not one of a layer at or past `kept_layers`."""
    match = _LAYER_INDEX.search(name)
    return match is None or int(match.group(1)) < kept_layers


def read_tensors(source, component: str, kept_layers: int) -> dict:
    """The component's tensors without those of layers at or past `kept_layers` (lazy: none is read)."""
    return {name: value for name, value in source.tensors(component).items() if in_kept_layers(name, kept_layers)}


def encoder_tensors(source, hidden_states: Sequence[int], component: str = "text_encoder") -> dict:
    """The tensors a text encoder that reads `hidden_states` loads (what loader.py counts before the load): all of
    them where the config cannot say (the load then names what is wrong)."""
    try:
        num_layers = int(read_config(source, component)["num_hidden_layers"])
        return read_tensors(source, component, layers_read(hidden_states, num_layers))
    except (KeyError, TypeError, ValueError):
        return source.tensors(component)


class Qwen3TextEncoder:
    def __init__(self, source, hidden_states: Sequence[int], component: str = "text_encoder",
                 tokenizer_component: str = "tokenizer"):
        """`hidden_states`: the transformers hidden_states indices the pipeline reads (negative from the end);
        the layers after the deepest of them are not loaded."""
        self.source = source
        self.component = component
        config = read_config(source, component)
        self.config = decoder_config(config)
        self.num_layers = self.config.num_hidden_layers  # the checkpoint's
        try:
            self.read = resolved_indices(hidden_states, self.num_layers)
            self.kept_layers = layers_read(hidden_states, self.num_layers)
        except ValueError as exc:
            raise ModelError(f"{source.location}: {exc}") from None
        if self.kept_layers < self.num_layers:
            for key in _PER_LAYER_KEYS:
                if config.get(key) is not None:
                    config[key] = list(config[key])[:self.kept_layers]
            self.config = decoder_config({**config, "num_hidden_layers": self.kept_layers})
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

    def load(self) -> None:
        """Build the network from the (mmap'd) weights of the layers it runs; a no-op when it is loaded."""
        if self._decoder is not None:
            return
        weights = backend.compute_weights(read_tensors(self.source, self.component, self.kept_layers))
        quantization = core_quantization({name: spec for name, spec in self.source.quantization(self.component).items()
                                          if in_kept_layers(name, self.kept_layers)})
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

    def _states(self, tokens: mx.array, mask: mx.array | None) -> list[mx.array]:
        # The last index is the final norm's output only when every layer is loaded.
        final_norm = self.kept_layers == self.num_layers
        return [h[0] for h in self._decoder.hidden_states(tokens, mask, self.read, final_norm)]

    def hidden_states(self, ids: list[int]) -> list[mx.array]:
        """transformers' hidden_states[i] for each i the pipeline reads (0 = embeddings, i = after i layers),
        each [T, hidden]. One unpadded prompt: with right padding and causal attention, the real
        tokens' states do not depend on the pads, so none are added."""
        self.load()
        return self._states(mx.array(np.asarray([ids], dtype=np.int32)), None)

    def padded_hidden_states(self, ids: list[int], length: int, pad_id: int) -> list[mx.array]:
        """hidden_states[i] for each i the pipeline reads, each [length, hidden], of `ids` right-padded to
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
        return self._states(mx.array(padded), mx.array(mask))

    def token_id(self, token: str) -> int | None:
        """The id of a (special) token, or None when the vocabulary lacks it."""
        return self.tokenizer.token_to_id(token)

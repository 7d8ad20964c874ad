"""Which transformers architectures the C++ decoder runs, and how each one's config.json and weight names
become what `_core.Decoder` takes.

Checkpoints spell the same thing several ways: transformers 5 saves `rope_parameters` (for Gemma 3 one per
layer type) and `layer_types`; configs on the Hub carry the older `rope_theta` + `rope_scaling`, Gemma 3's
`sliding_window_pattern` and `rope_local_base_freq`; a Gemma 3 with a vision tower keeps its text model
under `text_config` and its weights under `language_model.` prefixes; MoE and MLA keys (Qwen3-MoE,
GLM-4.7-Flash, GPT-OSS's swiglu_alpha / swiglu_limit) sit at the top level, the expert count under three
names. This file only renames those keys:
every default is the C++ DecoderConfig's (`DecoderConfig.defaults(architecture)`, which follows each
architecture's transformers config class), and the C++ decoder decides which layers slide.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxrunner import _core
from mlxrunner.errors import ModelError

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Architecture:
    core: str  # DecoderConfig.architecture
    sliding_windows: bool = False  # reads sliding_window, layer_types, sliding_window_pattern
    text_config: bool = False  # a multimodal checkpoint: its text model under text_config and language_model.


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama"),
    "Qwen3ForCausalLM": Architecture("qwen3"),
    "MistralForCausalLM": Architecture("mistral", sliding_windows=True),
    "MinistralForCausalLM": Architecture("mistral", sliding_windows=True),
    "Gemma3ForCausalLM": Architecture("gemma3", sliding_windows=True),
    "Gemma3ForConditionalGeneration": Architecture("gemma3", sliding_windows=True, text_config=True),
    "Qwen3MoeForCausalLM": Architecture("qwen3_moe"),
    "Glm4MoeLiteForCausalLM": Architecture("glm4_moe_lite"),
    "GptOssForCausalLM": Architecture("gpt_oss", sliding_windows=True),
}

# Keys that only mean sliding-window attention to architectures that have it: a Qwen3 config.json
# carries sliding_window (with use_sliding_window false) and, from transformers 5, layer_types.
WINDOW_KEYS = ("sliding_window", "layer_types", "sliding_window_pattern")
# The expert count's spellings: the Hub's Qwen3-MoE configs, transformers 5's saves, DeepSeek / GLM.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# Where a multimodal checkpoint keeps its text model's weights (transformers 5, then 4.50 and mlx-lm),
# and what the decoder calls them.
TEXT_WEIGHT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def architecture_of(config: dict) -> Architecture:
    names = config.get("architectures") or []
    architecture = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if architecture is None:
        raise ModelError(f"unsupported LLM architecture {names or config.get('model_type')!r}; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return architecture


def text_config(config: dict) -> dict:
    """The text model's config: config.json itself, or a multimodal checkpoint's text_config (whose
    embeddings the top level ties)."""
    if not architecture_of(config).text_config:
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ModelError("config.json: text_config must be an object")
    tied = config.get("tie_word_embeddings")
    return {**text, "architectures": config["architectures"],
            **({"tie_word_embeddings": tied} if tied is not None else {})}


def decoder_config(config: dict) -> _core.DecoderConfig:
    """config.json -> the C++ config, refusing what we do not run."""
    architecture = architecture_of(config)
    config = text_config(config)
    refuse_unsupported(config)
    values = {**config, "architecture": architecture.core}
    values.update(rope_configs(config, architecture))
    values["moe"] = moe_config(config)
    values["mla"] = nested(_core.MlaConfig, config)
    if architecture.core == "gemma3" and config.get("hidden_activation") is not None:
        values["hidden_act"] = config["hidden_activation"]
    if not architecture.sliding_windows:
        for key in WINDOW_KEYS:
            values.pop(key, None)
    elif "sliding_window" in config and config["sliding_window"] is None:
        values["sliding_window"] = 0  # null: no window (Mistral 7B v0.2 on), not the class default
    try:
        return _core.DecoderConfig.defaults(architecture.core).updated(values)
    except ValueError as exc:
        raise ModelError(f"config.json: {exc}") from None


def refuse_unsupported(config: dict) -> None:
    if config.get("attn_logit_softcapping") is not None:
        raise ModelError("config.json: attn_logit_softcapping (attention score soft-capping) is not supported")
    if config.get("use_bidirectional_attention"):
        raise ModelError("config.json: use_bidirectional_attention (an embedding model's attention) is not supported")


def nested(config_class: type, config: dict) -> dict:
    """The keys of config.json that a nested C++ config (MoeConfig, MlaConfig) has: they sit at the top level."""
    return {key: config[key] for key in config_class().to_dict() if key in config}


def moe_config(config: dict) -> dict:
    """DecoderConfig's nested `moe`; the expert count under whichever name the config uses."""
    moe = nested(_core.MoeConfig, config)
    count = next((config[key] for key in NUM_EXPERTS_KEYS if config.get(key) is not None), None)
    if count is not None:
        moe["num_experts"] = count
    return moe


def rope_configs(config: dict, architecture: Architecture) -> dict:
    """RoPE of the full-attention and the sliding-window layers, as DecoderConfig's `rope` and
    `sliding_rope`. transformers 5 saves Gemma 3's per layer type in rope_parameters; the Hub's Gemma 3
    configs scale only the global layers (rope_theta + rope_scaling) and give the sliding layers plain
    RoPE at rope_local_base_freq. Every other architecture uses one RoPE for all layers."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict) and {"full_attention", "sliding_attention"} & parameters.keys():
        return {"rope": rope_config(parameters.get("full_attention") or {}),
                "sliding_rope": rope_config(parameters.get("sliding_attention") or {})}
    rope = rope_config(config.get("rope_scaling") or parameters or {}, config.get("rope_theta"))
    if rope["rope_type"] == "yarn":
        # transformers' YaRN: a top-level original context first (Phi-3 keeps it there), then the
        # scaling's own, then the model's context
        rope["original_max_position_embeddings"] = (config.get("original_max_position_embeddings")
                                                    or rope.get("original_max_position_embeddings")
                                                    or config.get("max_position_embeddings"))
    if architecture.core == "gemma3":
        return {"rope": rope, "sliding_rope": {"rope_theta": config.get("rope_local_base_freq")}}
    return {"rope": rope, "sliding_rope": rope}


def rope_config(scaling: dict, theta: float | None = None) -> dict:
    """rope_theta and rope_parameters (transformers 5) or rope_scaling (4.x; its scaling type may be called
    "type") -> one DecoderConfig RoPE."""
    if not isinstance(scaling, dict):
        raise ModelError(f"config.json: rope scaling must be an object, got {scaling!r}")
    rope = {**scaling, "rope_type": scaling.get("rope_type") or scaling.get("type")}
    if theta is not None:  # 4.x keeps the base beside rope_scaling
        rope["rope_theta"] = theta
    kind = rope["rope_type"] or "default"
    if kind not in ROPE_TYPES:
        raise ModelError(f"config.json: rope scaling '{kind}' is not supported ({', '.join(ROPE_TYPES)})")
    if kind != "default" and scaling.get("factor") is None:
        raise ModelError(f"config.json: rope scaling '{kind}' needs a factor")
    return rope


def text_weights(config: dict, tensors: dict) -> dict:
    """The decoder's weights by the names it reads (model.*, lm_head.*): a multimodal checkpoint's text
    model renamed, its vision tower and projector left out. `tensors` may be the weights or their
    quantization parameters (both keyed by tensor name)."""
    if not architecture_of(config).text_config:
        return tensors
    out = {}
    for name, value in tensors.items():
        for prefix, renamed in TEXT_WEIGHT_PREFIXES:
            if name.startswith(prefix):
                out[renamed + name.removeprefix(prefix)] = value
                break
    return out

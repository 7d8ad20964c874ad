"""Network configs: one default per value, in C++ (`_core.XxxConfig`), read from config.json by `from_dict`.

Checked here: the networks the loaders build use exactly what their config.json files say; a default-made
config equals the reference library's __init__ defaults; and a bad value is an error that names its key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlxrunner import _core
from mlxrunner.errors import ModelError
from mlxrunner.imagegen import load_pipeline
from mlxrunner.imagegen.zimage import transformer_config
from mlxrunner.llm import load as load_llm
from mlxrunner.llm.architectures import WINDOW_KEYS, decoder_config
from mlxrunner.llm.model import sampler_options
from mlxrunner.request import Options

FIXTURES = Path(__file__).parents[1] / "fixtures"
IMAGE_MODELS = ["zimage-tiny", "flux2-klein-tiny", "flux2-klein-base-tiny"]
LLMS = ["llama-tiny", "llama3-tiny", "qwen3-tiny", "qwen3-tiny-bf16", "qwen3-yarn-tiny"]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_has_the_files_values(config, file: dict) -> None:
    """Every key of `file` that names a field of `config` has the file's value (null: absent)."""
    fields = config.to_dict()
    named = {key: value for key, value in file.items() if key in fields and value is not None}
    assert named, "the file names none of the config's fields"
    for key, value in named.items():
        if isinstance(value, dict):
            assert_has_the_files_values(getattr(config, key), value)
        else:
            assert fields[key] == value, key


# --- the built networks use their files' values ------------------------------------------------


@pytest.fixture(scope="module", params=IMAGE_MODELS)
def image_model(request):
    folder = FIXTURES / request.param
    return folder, load_pipeline(str(folder))


def test_image_transformer_config_is_the_files(image_model):
    folder, pipe = image_model
    file = read(folder / "transformer" / "config.json")
    config_type = _core.ZImageConfig if "cap_feat_dim" in file else _core.Flux2Config
    built = pipe.transformer.config
    assert isinstance(built, config_type)
    assert built == config_type.from_dict(file)
    assert_has_the_files_values(built, file)
    if "all_patch_size" in file:  # Z-Image lists patch sizes per resolution; the loader runs the first
        assert (built.patch_size, built.f_patch_size) == (file["all_patch_size"][0], file["all_f_patch_size"][0])


def test_image_vae_config_is_the_files(image_model):
    folder, pipe = image_model
    file = read(folder / "vae" / "config.json")
    networks = [pipe.vae.decoder] + ([pipe.vae.encoder] if hasattr(pipe.vae, "encoder") else [])
    for network in networks:
        assert network.config == _core.VaeConfig.from_dict(file)
        assert_has_the_files_values(network.config, file)


def test_image_schedule_is_the_files(image_model):
    folder, pipe = image_model
    file = read(folder / "scheduler" / "scheduler_config.json")
    assert pipe.schedule == _core.FlowMatchSchedule.from_dict(file)
    assert_has_the_files_values(pipe.schedule, file)


@pytest.mark.parametrize("name", LLMS)
def test_llm_decoder_config_is_the_files(name):
    folder = FIXTURES / "llm" / name
    # Qwen3's layer_types (all full_attention) and sliding_window (null) do not apply to Llama and Qwen3.
    file = {key: value for key, value in read(folder / "config.json").items() if key not in WINDOW_KEYS}
    built = load_llm(str(folder)).decoder.config
    # What the loader translates: the architecture from "architectures", RoPE (of every layer: none slides)
    # from "rope_parameters".
    architecture = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}[file["architectures"][0]]
    translated = {**file, "architecture": architecture, "rope": file["rope_parameters"],
                  "sliding_rope": file["rope_parameters"]}
    assert built == _core.DecoderConfig.from_dict(translated)
    assert_has_the_files_values(built, file)
    assert_has_the_files_values(built.rope, file["rope_parameters"])
    assert built.architecture == architecture


@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "glm4-moe-lite-tiny", "gpt-oss-tiny"])
def test_moe_decoder_config_is_the_files(name):
    """The MoE and MLA keys sit at the top level of config.json; the expert count has three names."""
    file = read(FIXTURES / "llm" / name / "config.json")
    built = load_llm(str(FIXTURES / "llm" / name)).decoder.config
    assert_has_the_files_values(built.moe, file)
    assert built.moe.num_experts == file.get("num_local_experts", file.get("n_routed_experts")) == 8
    if name.startswith("glm"):
        assert_has_the_files_values(built.mla, file)
        assert built.mlp_layer_types == file["mlp_layer_types"]


def test_null_q_lora_rank_means_one_q_proj():
    """from_dict keeps a field's default for null, except where null is a value: an optional field's none."""
    config = decoder_config({"architectures": ["Glm4MoeLiteForCausalLM"], "q_lora_rank": None, "n_routed_experts": 4})
    assert config.mla.q_lora_rank is None and config.moe.num_experts == 4
    assert decoder_config({"architectures": ["Glm4MoeLiteForCausalLM"]}).mla.q_lora_rank == 768


def test_minilm_bert_config_is_the_files(minilm_dir):
    from mlxrunner import store
    from mlxrunner.embed.bert import BertEmbedder

    file = read(minilm_dir / "config.json")
    built = BertEmbedder(store.resolve(str(minilm_dir))).encoder.config
    assert built == _core.BertConfig.from_dict(file)
    assert_has_the_files_values(built, file)


# --- the defaults are the reference libraries' --------------------------------------------------

# Each reference's __init__ defaults for the fields the struct has, as the library writes them, and how
# its names and values map onto the struct's: a list of patch sizes -> the first one; None where the
# reference derives the value -> 0, the struct's "derived".
# YaRN's as transformers' _compute_yarn_parameters: beta_fast 32, beta_slow 1, truncate true; mscale,
# mscale_all_dim and attention_factor None (attention_factor then derived) -> 0.
DEFAULT_ROPE = dict(dims=0, traditional=False, rope_theta=10000.0, rope_type="default", factor=1.0,
                    low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192,
                    beta_fast=32.0, beta_slow=1.0, mscale=0.0, mscale_all_dim=0.0, attention_factor=0.0, truncate=True)
# Not in LlamaConfig: sliding windows and Gemma's extras, off; the sliding layers' RoPE is rope's.
NO_WINDOWS = dict(sliding_window=0, layer_types=[], sliding_window_pattern=0, sliding_rope=dict(DEFAULT_ROPE),
                  hidden_act="silu", query_pre_attn_scalar=0.0, final_logit_softcapping=0.0)
# Not in LlamaConfig: routed experts (MoeConfig: Qwen3MoeConfig's routing fields, DeepSeek's one group, no
# scaling, no shared experts, GptOssConfig's SwiGLU clamp; num_experts 0, a dense model) and MLA
# (Glm4MoeLiteConfig's), unused.
QWEN3_MOE_ROUTING = dict(num_experts=0, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                         n_group=1, topk_group=1, routed_scaling_factor=1.0, n_shared_experts=0, swiglu_alpha=1.702,
                         swiglu_limit=7.0)
NO_EXPERTS = dict(moe=dict(QWEN3_MOE_ROUTING), mlp_layer_types=[], decoder_sparse_step=1, mlp_only_layers=[],
                  first_k_dense_replace=0,
                  mla=dict(q_lora_rank=768, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=192,
                           v_head_dim=256, rope_interleave=True))
GPT_OSS_ROPE = {**DEFAULT_ROPE, "rope_type": "yarn", "factor": 32.0, "rope_theta": 150000.0,
                "original_max_position_embeddings": 4096, "truncate": False}
REFERENCES = {
    # n_kv_heads: 30 there, its default n_heads, and unused (its attention is built from n_heads alone):
    # derived from n_heads here.
    "diffusers 0.42.1 ZImageTransformer2DModel": (_core.ZImageConfig, dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])),
    "diffusers 0.42.1 Flux2Transformer2DModel": (_core.Flux2Config, dict(
        patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48, attention_head_dim=128,
        num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True)),
    "diffusers 0.42.1 AutoencoderKL": (_core.VaeConfig, dict(
        in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1, latent_channels=4,
        norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)),
    "diffusers 0.42.1 FlowMatchEulerDiscreteScheduler": (_core.FlowMatchSchedule, dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential")),
    # LlamaForCausalLM: architecture "llama"; rope_parameters None: the default RoPE with rope_theta 10000.
    "transformers 5.x LlamaConfig": (_core.DecoderConfig, dict(
        architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, head_dim=None,
        rope=dict(DEFAULT_ROPE), **NO_WINDOWS, **NO_EXPERTS)),
    # MistralForCausalLM / MinistralForCausalLM: sliding_window 4096 on every layer (layer_types None).
    "transformers 5.x MistralConfig": (lambda: _core.DecoderConfig.defaults("mistral"), dict(
        architecture="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, head_dim=None, rope=dict(DEFAULT_ROPE),
        **{**NO_WINDOWS, "sliding_window": 4096, "sliding_rope": dict(DEFAULT_ROPE)}, **NO_EXPERTS)),
    # Gemma3ForCausalLM: default_theta {"global": 1e6, "local": 1e4}; layer_types None: every 6th layer
    # full (its sliding_window_pattern default); hidden_act is its hidden_activation.
    "transformers 5.x Gemma3TextConfig": (lambda: _core.DecoderConfig.defaults("gemma3"), dict(
        architecture="gemma3", vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        query_pre_attn_scalar=256.0, sliding_window=4096, layer_types=[], sliding_window_pattern=6,
        final_logit_softcapping=None, rope={**DEFAULT_ROPE, "rope_theta": 1e6},
        sliding_rope={**DEFAULT_ROPE, "rope_theta": 1e4}, **NO_EXPERTS)),
    # Qwen3MoeForCausalLM: num_local_experts (the struct's num_experts) 128; head_dim None (derived).
    "transformers 5.x Qwen3MoeConfig": (lambda: _core.DecoderConfig.defaults("qwen3_moe"), dict(
        architecture="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, head_dim=None, rope=dict(DEFAULT_ROPE), **NO_WINDOWS,
        **{**NO_EXPERTS, "moe": {**QWEN3_MOE_ROUTING, "num_experts": 128}})),
    # Glm4MoeLiteForCausalLM: n_routed_experts 64 with DeepSeek-V3's routing fields; its mlp_layer_types
    # default (the first layer dense, the rest sparse) is first_k_dense_replace 1 here.
    "transformers 5.x Glm4MoeLiteConfig": (lambda: _core.DecoderConfig.defaults("glm4_moe_lite"), dict(
        architecture="glm4_moe_lite", vocab_size=154880, hidden_size=2048, intermediate_size=10240,
        num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, head_dim=None, rope=dict(DEFAULT_ROPE),
        **NO_WINDOWS, **{**NO_EXPERTS, "first_k_dense_replace": 1, "moe": dict(
            num_experts=64, num_experts_per_tok=4, moe_intermediate_size=1536, norm_topk_prob=True, n_group=1,
            topk_group=1, routed_scaling_factor=1.8, n_shared_experts=1, swiglu_alpha=1.702, swiglu_limit=7.0)})),
    # GptOssForCausalLM: num_local_experts 128; layer_types None: sliding and full alternating, the first
    # sliding (sliding_window_pattern 2 here); rope_parameters None: its YaRN (factor 32 over 4096, theta
    # 150000, truncate false) on every layer. Its experts are intermediate_size wide (moe_intermediate_size
    # is not its key: the decoder uses intermediate_size).
    "transformers 5.x GptOssConfig": (lambda: _core.DecoderConfig.defaults("gpt_oss"), dict(
        architecture="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=False,
        rope=GPT_OSS_ROPE,
        **{**NO_WINDOWS, "sliding_window": 128, "sliding_window_pattern": 2, "sliding_rope": GPT_OSS_ROPE},
        **{**NO_EXPERTS, "moe": {**QWEN3_MOE_ROUTING, "num_experts": 128, "num_experts_per_tok": 4}})),
    "transformers 5.x BertConfig": (_core.BertConfig, dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)),
    # api/types.go DefaultOptions; seed -1 there means unseeded.
    "Ollama DefaultOptions": (_core.SamplerOptions, dict(
        temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1, repeat_last_n=64,
        presence_penalty=0.0, frequency_penalty=0.0, seed=None)),
}
# Not from the reference: the rope dict's dims (0: whole heads, as Llama and Qwen3 rotate) and traditional
# (False: transformers' rotate_half); its llama3 values are Llama 3.1's, which transformers requires
# in a llama3 config and we take when one leaves them out.


DERIVED = {"n_kv_heads", "out_channels", "num_key_value_heads", "head_dim", "final_logit_softcapping"}


def as_struct_values(reference: dict) -> dict:
    out = {}
    for key, value in reference.items():
        if key.startswith("all_"):
            key, value = key.removeprefix("all_"), value[0]
        if key in DERIVED and value is None:
            value = 0
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


@pytest.mark.parametrize("reference", REFERENCES)
def test_defaults_are_the_reference_librarys(reference):
    config_type, defaults = REFERENCES[reference]
    assert config_type().to_dict() == as_struct_values(defaults)


# --- from_dict, to_dict, equality ----------------------------------------------------------------


@pytest.mark.parametrize("config_type, values, message", [
    (_core.ZImageConfig, {"dim": "abc"}, "dim: expected an integer, got 'abc'"),
    (_core.DecoderConfig, {"vocab_size": 2**40}, "vocab_size: 1099511627776 is out of range for a 32-bit integer"),
    (_core.DecoderConfig, {"hidden_size": 64.5}, "hidden_size: expected an integer, got 64.5"),
    (_core.DecoderConfig, {"tie_word_embeddings": 1}, "tie_word_embeddings: expected true or false, got 1"),
    (_core.DecoderConfig, {"rope": {"factor": "x"}}, "rope.factor: expected a number, got 'x'"),
    (_core.DecoderConfig, {"rope": 8.0}, "rope: expected a dict, got 8.0"),
    (_core.BertConfig, {"hidden_act": 3}, "hidden_act: expected a string, got 3"),
    (_core.BertConfig, {"layer_norm_eps": 1e300}, "layer_norm_eps: 1e+300 is out of range for a float"),
    (_core.ZImageConfig, {"axes_dims": [32, "48", 48]}, "axes_dims[1]: expected an integer, got '48'"),
    (_core.ZImageConfig, {"axes_lens": 1024}, "axes_lens: expected a list, got 1024"),
    (_core.SamplerOptions, {"seed": -1}, "seed: -1 is out of range for an unsigned 64-bit integer"),
])
def test_a_bad_value_is_a_value_error_naming_its_key(config_type, values, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        config_type.from_dict(values)


def test_assigning_a_bad_value_names_the_field():
    config = _core.Flux2Config()
    with pytest.raises(ValueError, match="^num_layers: expected an integer, got None$"):
        config.num_layers = None
    config.num_layers = 3
    assert config.num_layers == 3


def test_from_dict_ignores_unknown_keys_and_nulls():
    config = _core.Flux2Config.from_dict({"_class_name": "Flux2Transformer2DModel", "out_channels": None, "eps": 1e-5,
                                          "num_layers": 2.0})
    assert config == _core.Flux2Config.from_dict({"eps": 1e-5, "num_layers": 2})
    assert config.out_channels == 0 and config.num_layers == 2


def test_to_dict_round_trips_and_keeps_the_files_numbers():
    config = _core.DecoderConfig.from_dict({"rms_norm_eps": 1e-5, "rope": {"rope_theta": 500000.0,
                                                                           "rope_type": "llama3", "factor": 8.0}})
    assert config.to_dict()["rms_norm_eps"] == 1e-5  # the float32 field reads back as the number written
    assert _core.DecoderConfig.from_dict(config.to_dict()) == config
    assert config != _core.DecoderConfig() and config != "a string"
    assert "rope=RopeConfig(" in repr(config) and "rope_type='llama3'" in repr(config)


def test_a_nested_config_is_changed_in_place():
    config = _core.DecoderConfig()
    config.rope.rope_theta = 1e6
    assert config.rope.rope_theta == 1e6
    config.rope = {"rope_type": "linear", "factor": 2.0}
    assert (config.rope.rope_type, config.rope.factor, config.rope.rope_theta) == ("linear", 2.0, 10000.0)


def test_a_built_networks_config_is_a_copy():
    model = load_llm(str(FIXTURES / "llm" / "qwen3-tiny"))
    config = model.decoder.config
    config.vocab_size = 7
    assert model.decoder.config.vocab_size == 503


# --- the Python translators ------------------------------------------------------------------------


def test_sampler_options_sets_only_what_the_request_gave():
    assert sampler_options(Options()) == _core.SamplerOptions()
    given = sampler_options(Options(temperature=0.3, top_k=5), prompt_seed=9)
    expected = _core.SamplerOptions()
    expected.temperature, expected.top_k, expected.seed = 0.3, 5, 9
    assert given == expected
    assert sampler_options(Options(seed=-1), prompt_seed=9).seed is None  # Ollama: negative means unseeded


def test_translators_name_the_file_and_key():
    with pytest.raises(ModelError, match=r"^here: transformer/config.json: dim: expected an integer, got 'abc'$"):
        transformer_config({"dim": "abc"}, "here")
    with pytest.raises(ModelError, match=r"^config.json: rope.rope_theta: expected a number, got 'x'$"):
        decoder_config({"architectures": ["LlamaForCausalLM"], "rope_theta": "x"})


@pytest.mark.parametrize("rope, expected", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5},
     dict(rope_type="linear", factor=2.0, rope_theta=5e5)),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 2.0}},
     dict(rope_type="llama3", factor=8.0, rope_theta=5e5, low_freq_factor=2.0, high_freq_factor=4.0)),
    ({}, dict(rope_type="default", rope_theta=10000.0)),
    # YaRN's original context: the scaling's, else a top-level one, else the model's (transformers' order:
    # a top-level one wins)
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
      "max_position_embeddings": 131072}, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 131072},
     dict(rope_type="yarn", original_max_position_embeddings=131072)),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
      "original_max_position_embeddings": 4096}, dict(original_max_position_embeddings=4096)),
])
def test_rope_from_rope_scaling_or_rope_parameters(rope, expected):
    config = decoder_config({"architectures": ["LlamaForCausalLM"], **rope})
    assert {key: config.rope.to_dict()[key] for key in expected} == expected


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "longrope", "factor": 4.0}, "rope scaling 'longrope' is not supported"),
    ({"rope_type": "linear"}, "rope scaling 'linear' needs a factor"),
])
def test_unsupported_rope_scaling_is_refused(scaling, message):
    with pytest.raises(ModelError, match=message):
        decoder_config({"architectures": ["LlamaForCausalLM"], "rope_parameters": scaling})


# --- sliding windows and Gemma 3: every spelling checkpoints use -------------------------------------


def windows(config: _core.DecoderConfig) -> list[int]:
    return [config.window(i) for i in range(config.num_hidden_layers)]


@pytest.mark.parametrize("name, expected_windows, rope, sliding_rope", [
    ("mistral-tiny", [8, 8], dict(rope_type="default", rope_theta=1e4), dict(rope_type="default", rope_theta=1e4)),
    # transformers 5: layer_types and rope_parameters per layer type
    ("gemma3-tiny", [8, 0, 8, 0], dict(rope_type="linear", factor=8.0, rope_theta=1e6),
     dict(rope_type="default", rope_theta=1e4)),
    # the Hub's spelling: sliding_window_pattern 3 (every third layer full), rope_theta + rope_scaling for
    # the global layers, rope_local_base_freq for the sliding ones; under text_config
    ("gemma3-vlm-tiny", [8, 8, 0], dict(rope_type="linear", factor=8.0, rope_theta=1e6),
     dict(rope_type="default", rope_theta=1e4)),
])
def test_sliding_window_fixtures_are_read_as_transformers_reads_them(name, expected_windows, rope, sliding_rope):
    file = read(FIXTURES / "llm" / name / "config.json")
    built = load_llm(str(FIXTURES / "llm" / name)).decoder.config
    assert_has_the_files_values(built, file.get("text_config", file))
    assert windows(built) == expected_windows
    assert {key: built.rope.to_dict()[key] for key in rope} == rope
    assert {key: built.sliding_rope.to_dict()[key] for key in sliding_rope} == sliding_rope
    if name.startswith("gemma3"):
        assert built.hidden_act == "gelu_pytorch_tanh"  # from hidden_activation


def test_a_sparse_hub_gemma3_config_takes_gemma3s_defaults():
    """gemma-3-4b-it's config.json names only what differs from Gemma3TextConfig's defaults."""
    built = decoder_config({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}})
    assert (built.architecture, built.head_dim, built.query_pre_attn_scalar, built.tie_word_embeddings) == (
        "gemma3", 256, 256.0, True)
    assert windows(built) == [0 if (i + 1) % 6 == 0 else 1024 for i in range(34)]
    assert (built.rope.rope_type, built.rope.factor, built.rope.rope_theta) == ("linear", 8.0, 1e6)
    assert (built.sliding_rope.rope_type, built.sliding_rope.rope_theta) == ("default", 1e4)


@pytest.mark.parametrize("config, expected", [
    # Qwen3 configs carry sliding_window with use_sliding_window false, and layer_types: not windows to us.
    ({"architectures": ["Qwen3ForCausalLM"], "sliding_window": 4096, "use_sliding_window": False,
      "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}, [0, 0]),
    ({"architectures": ["MistralForCausalLM"], "num_hidden_layers": 2, "sliding_window": None}, [0, 0]),
    ({"architectures": ["MistralForCausalLM"], "num_hidden_layers": 2}, [4096, 4096]),  # MistralConfig's default
    ({"architectures": ["MinistralForCausalLM"], "num_hidden_layers": 3, "sliding_window": 32,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, [32, 0, 32]),
])
def test_which_layers_slide(config, expected):
    assert windows(decoder_config(config)) == expected


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "text_config must be an object"),
])
def test_unsupported_gemma_variants_are_refused(config, message):
    with pytest.raises(ModelError, match=message):
        decoder_config(config)


@pytest.mark.parametrize("config, message", [
    ({"num_hidden_layers": 2, "layer_types": ["full_attention"]}, "layer_types names 1 layers, the model has 2"),
    ({"num_hidden_layers": 1, "layer_types": ["chunked_attention"]}, "unsupported layer type 'chunked_attention'"),
    ({"num_hidden_layers": 1, "sliding_window": 0, "layer_types": ["sliding_attention"]},
     "layer 0 uses sliding-window attention but sliding_window is not set"),
])
def test_bad_window_configs_name_the_problem(config, message):
    """The decoder checks its config before it reads a weight."""
    values = {"vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 8, **config}
    with pytest.raises(ValueError, match=message):
        _core.Decoder(_core.DecoderConfig.defaults("mistral").updated(values), {})

"""Quantized tiny LLMs through our C++ decoder against mlx-lm on the same folders.

The folders are mlx-lm's own converter's output (tests/fixtures/llm-quant/) and the goldens what
mlx-lm generates from them (tests/goldens/mlx_lm_quant.json; both from scripts/goldens_quant.py). No
mlx-lm here. Also: Ollama LLM stores and our own `quantize` output against the float model holding
the exactly dequantized weights, and weights that stay packed in memory.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU, float32_tol
from ollama_store import create_llm

from mlxrunner import _core
from mlxrunner.cli.quantize import main as quantize_main
from mlxrunner.errors import ModelError
from mlxrunner.llm import load
from mlxrunner.llm.model import sampler_options
from mlxrunner.request import Options
from mlxrunner.store import resolve

ROOT = Path(__file__).parents[1]
GOLDENS = json.loads((ROOT / "goldens" / "mlx_lm_quant.json").read_text())
FIXTURES = sorted(GOLDENS["fixtures"])
GREEDY = sampler_options(Options(temperature=0.0, repeat_penalty=1.0))
# Both sides run MLX's float32 kernels on the same packed weights: only summation order differs.
FLOAT32_TOL = float32_tol(1e-4, 1e-2)


@pytest.fixture(scope="module", params=FIXTURES)
def case(request):
    golden = GOLDENS["fixtures"][request.param]
    return golden, load(str(ROOT.parent / golden["model"]))


def greedy_ids(model, ids: list[int], count: int) -> list[int]:
    generator = _core.Generator(model.decoder, ids, GREEDY, 512)
    return [next(generator) for _ in range(count)]


def test_fixtures_cover_what_the_issue_asks():
    recipes = {"q4-g64", "q8-g32", "mixed-3-6", "mxfp4", "nvfp4", "mxfp8"}
    for model in ("qwen3-tiny", "llama3-tiny"):
        assert {f"{model}-{r}" for r in recipes} <= set(FIXTURES)
    # mlx-lm's stacked, packed experts; GLM's kv_b_proj split into embed_q / unembed_out.
    assert {"qwen3-moe-tiny-q4-g64", "glm4-moe-lite-tiny-q8-g32"} <= set(FIXTURES)
    assert {"gemma3-vlm-tiny-q4-g64", "gemma3-vlm-tiny-mxfp4"} <= set(FIXTURES)  # sliding windows, packed tied head
    # mlx-lm's GPT-OSS: stacked biased experts, packed; the router at 8 bits (affine) beside mxfp4 experts.
    assert {"gpt-oss-tiny-mxfp4", "gpt-oss-tiny-q4-g64"} <= set(FIXTURES)
    assert any(GOLDENS["fixtures"][f]["prompts"][-1]["id"] == "long" and
               len(GOLDENS["fixtures"][f]["prompts"][-1]["input_ids"]) > 512 for f in FIXTURES)


def test_tokenizer_gives_mlx_lm_ids(case):
    golden, model = case
    for prompt in golden["prompts"]:
        assert model.tokenizer.encode(prompt["text"], add_bos=True) == prompt["input_ids"], prompt["id"]
    assert model.tokenizer.eos_ids == frozenset(golden["eos_ids"])


def test_greedy_continuations_are_token_identical(case):
    golden, model = case
    for prompt in golden["prompts"]:
        ours = greedy_ids(model, prompt["input_ids"], len(prompt["new_ids"]))
        if ON_GPU:
            # A CUDA GPU sums in another order (and runs float32 products as TF32): a near-tie can flip a
            # token, and the continuation then diverges. Agreement up to the first low-margin step.
            safe = next((i for i, m in enumerate(prompt["top2_margins"]) if m < 1.0), len(prompt["new_ids"]))
            assert ours[:safe] == prompt["new_ids"][:safe], prompt["id"]
        else:
            assert ours == prompt["new_ids"], prompt["id"]


def test_last_position_logits(case):
    golden, model = case
    entry = golden["last_logits"]
    prompt = next(p for p in golden["prompts"] if p["id"] == entry["prompt_id"])
    ours = model.logits(prompt["input_ids"])[-1]
    ref = np.array(entry["values"], dtype=np.float32)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= FLOAT32_TOL


# -- against the float model holding the exactly dequantized weights ---------------------------


def dequantized_copy(folder: str | Path, out: Path, models_dir: str | None = None) -> Path:
    """A float folder whose weights are ``folder``'s packed ones, dequantized exactly (float32; times their
    global scale when they have one)."""
    source = resolve(str(folder), models_dir)
    tensors, params = source.tensors(), source.quantization()
    weights = {}
    for name, value in tensors.items():
        if name.endswith(("_scale", "_qbias")):
            continue
        p = params.get(name)
        if p is not None:
            value = mx.dequantize(value, tensors[name + "_scale"], tensors.get(name + "_qbias"),
                                  group_size=p.group_size, bits=p.bits, mode=p.mode, dtype=mx.float32)
            if name + "_global_scale" in tensors:
                value = value * tensors[name + "_global_scale"].reshape(())
        weights[name] = value
    out.mkdir()
    config = source.read_json("config.json")
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(source.file_path(name), out / name)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def assert_same_model(quantized, dequantized, prompt: str = "The quick brown fox jumps over the lazy dog.") -> None:
    ids = quantized.tokenizer.encode(prompt, add_bos=True)
    ours, ref = quantized.logits(ids), dequantized.logits(ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= FLOAT32_TOL
    if not ON_GPU:
        assert greedy_ids(quantized, ids, 16) == greedy_ids(dequantized, ids, 16)


@pytest.mark.parametrize("quant_type", ["int4", "int8", "nvfp4", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("model", ["llama-tiny", "glm4-moe-lite-tiny", "gpt-oss-tiny"])
def test_ollama_llm_store_runs_its_packed_weights(tmp_path, model, quant_type):
    """x/create's per-tensor mix (float embeddings, 8-bit lm_head and v/k/down) in combined blobs; a MoE's
    experts in one packed blob per layer (GLM-4.7-Flash is the LLM Ollama's MLX runner first served;
    GPT-OSS's fused 3-D experts stay float, its attention projections are packed)."""
    create_llm(tmp_path / "models", f"library/{model}:q", ROOT / "fixtures" / "llm" / model, quant_type)
    models_dir = str(tmp_path / "models")
    quantized = load(f"{model}:q", models_dir=models_dir)
    reference = load(str(dequantized_copy(f"{model}:q", tmp_path / "float", models_dir)))
    assert_same_model(quantized, reference)


@pytest.mark.parametrize("quant_type", ["int4", "mxfp8"])
@pytest.mark.parametrize("name", ["mistral-tiny", "gemma3-tiny", "gemma3-vlm-tiny"])
def test_ollama_store_of_a_sliding_window_model_runs_its_packed_weights(tmp_path, name, quant_type):
    """Windows of 8 tokens; a prompt of 40 and a 16-token continuation cross them."""
    create_llm(tmp_path / "models", f"library/{name}:q", ROOT / "fixtures" / "llm" / name, quant_type)
    models_dir = str(tmp_path / "models")
    quantized = load(f"{name}:q", models_dir=models_dir)
    assert any(".q_proj." in n for n in resolve(f"{name}:q", models_dir).quantization())
    reference = load(str(dequantized_copy(f"{name}:q", tmp_path / "float", models_dir)))
    assert_same_model(quantized, reference, "Once upon a time there was a little robot who wanted to learn how to "
                                            "write poems. It read every book in the library.")


@pytest.mark.parametrize("args", [["--bits", "4"], ["--bits", "8", "--mode", "mxfp8"],
                                  ["--bits", "4", "--mode", "nvfp4", "--mixed"]])
def test_quantize_output_runs(tmp_path, args):
    assert quantize_main([str(ROOT / "fixtures" / "llm" / "qwen3-tiny"), str(tmp_path / "q"), *args]) == 0
    assert_same_model(load(str(tmp_path / "q")), load(str(dequantized_copy(tmp_path / "q", tmp_path / "float"))))


# -- nvfp4 global scales ------------------------------------------------------------------------

# A tied embedding (so the LM head too), a projection fused with others (q | k | v) and a lone one.
GLOBAL_SCALES = {"model.embed_tokens.weight": 0.37, "model.layers.0.self_attn.q_proj.weight": 1.9,
                 "model.layers.1.mlp.down_proj.weight": 0.011}


def with_global_scales(out: Path, scales: dict[str, float], suffix: str = "_scale_2", dtype=mx.float32) -> Path:
    """mlx-lm's nvfp4 qwen3-tiny with ModelOpt's per-tensor ``<weight>_scale_2`` beside some weights."""
    shutil.copytree(ROOT / "fixtures" / "llm-quant" / "qwen3-tiny-nvfp4", out)
    (out / "model.safetensors.index.json").unlink()
    weights = mx.load(str(out / "model.safetensors"))
    weights |= {name + suffix: mx.array(scale, dtype=dtype) for name, scale in scales.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def test_nvfp4_global_scales_multiply_the_dequantized_weights(tmp_path):
    folder = with_global_scales(tmp_path / "scaled", GLOBAL_SCALES)
    assert {n for n in resolve(str(folder)).tensors() if n.endswith("_global_scale")} == \
        {n + "_global_scale" for n in GLOBAL_SCALES}
    scaled = load(str(folder))
    assert_same_model(scaled, load(str(dequantized_copy(folder, tmp_path / "float"))))
    ids = scaled.tokenizer.encode("The quick brown fox", add_bos=True)
    unscaled = load(str(ROOT / "fixtures" / "llm-quant" / "qwen3-tiny-nvfp4"))
    assert np.abs(scaled.logits(ids) - unscaled.logits(ids)).max() > 0.1  # the scales took effect


def nvfp4_store_with_global_scales(tmp_path: Path, fixture: str, scales: dict[str, float]):
    """The LLM fixture as an Ollama nvfp4 store whose listed weights carry these global scales (blob entries
    ``<weight>.global_scale``, read as ``<weight>_global_scale``): the loaded store and its dequantized float copy."""
    name, models_dir = f"{fixture}:q", str(tmp_path / "models")
    create_llm(tmp_path / "models", f"library/{name}", ROOT / "fixtures" / "llm" / fixture, "nvfp4",
               global_scales=scales)
    assert {n for n in resolve(name, models_dir).tensors() if n.endswith("_global_scale")} == \
        {n + "_global_scale" for n in scales}
    reference = load(str(dequantized_copy(name, tmp_path / "float", models_dir)))
    return load(name, models_dir=models_dir), reference


def test_ollama_blob_global_scales(tmp_path):
    """Ollama's name for it: ``<weight>.global_scale`` in the weight's combined blob."""
    scales = {"model.layers.0.self_attn.q_proj.weight": 1.9, "model.layers.1.mlp.gate_proj.weight": 0.2}
    assert_same_model(*nvfp4_store_with_global_scales(tmp_path, "llama-tiny", scales))


def test_packed_experts_take_their_global_scales(tmp_path):
    """nvfp4 experts in Ollama's packed blobs, each with its own global scale: stacked, one per expert, each
    expert's products scaled by its own (tokens through different experts see different factors)."""
    experts = [f"model.layers.0.mlp.experts.{e}.{proj}.weight" for e in range(8) for proj in ("gate_proj", "up_proj")]
    scales = {name: 0.25 + 0.3 * i for i, name in enumerate(experts)}
    quantized, reference = nvfp4_store_with_global_scales(tmp_path, "qwen3-moe-tiny", scales)
    # 32+ prompt tokens, top 2: the prefill runs the experts sorted, decoding unsorted
    assert_same_model(quantized, reference, " ".join(["The quick brown fox"] * 12))


def test_glm_latent_rows_take_their_global_scale(tmp_path):
    """MLA dequantizes kv_b_proj once at load (text/mla): its nvfp4 global scale multiplies it there."""
    scales = {"model.layers.0.self_attn.kv_b_proj.weight": 1.9, "model.layers.2.self_attn.kv_b_proj.weight": 0.3}
    assert_same_model(*nvfp4_store_with_global_scales(tmp_path, "glm4-moe-lite-tiny", scales))


@pytest.mark.parametrize("edit, message", [
    (dict(scales={"model.layers.0.self_attn.q_proj.weight": 2.0}, dtype=mx.float16), "must be one F32 value"),
    (dict(scales={"model.layers.0.self_attn.q_proj.weight": 2.0}, suffix=".global_scale", dtype=mx.bfloat16),
     "must be one F32 value"),
])
def test_a_bad_global_scale_names_the_tensor(tmp_path, edit, message):
    folder = with_global_scales(tmp_path / "bad", **edit)
    with pytest.raises(ModelError, match=f"tensor 'model.layers.0.self_attn.q_proj.weight': .*{message}"):
        resolve(str(folder)).quantization()


def test_a_global_scale_on_an_affine_weight_is_refused(tmp_path):
    folder = tmp_path / "affine"
    shutil.copytree(ROOT / "fixtures" / "llm-quant" / "qwen3-tiny-q4-g64", folder)
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight_scale_2"] = mx.array(2.0)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(ModelError, match="q_proj.weight': a global scale belongs to nvfp4 weights, not affine"):
        resolve(str(folder)).quantization()


# -- memory --------------------------------------------------------------------------------------


def resident_bytes_of(folder: Path) -> int:
    """MLX's active memory that loading ``folder`` adds (weights read and fused)."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    model = load(str(folder))
    gc.collect()
    held = mx.get_active_memory() - before
    del model
    return held


def allocated_bytes(nbytes: int) -> int:
    """What MLX's allocator reserves for an array of nbytes: on CUDA (MLX 0.32.4's allocator) a buffer under 16 KiB
    is rounded up to a power of two, a larger one to whole 16 KiB pages; the CPU's takes the bytes as they are. A tiny
    model's many small tensors (a 3-bit fixture's most of all) weigh ~27 % more on CUDA than in the file."""
    if mx.default_device() != mx.gpu or not mx.cuda.is_available():
        return nbytes
    if nbytes <= 8:
        return 8
    page = 16384
    return 1 << (nbytes - 1).bit_length() if nbytes < page else page * -(-nbytes // page)


@pytest.mark.parametrize("fixture", ["qwen3-tiny-q4-g64", "llama3-tiny-mxfp4", "llama-tiny-mixed-3-6"])
def test_weights_stay_packed_in_memory(fixture):
    folder = ROOT / "fixtures" / "llm-quant" / fixture
    file_bytes = sum(allocated_bytes(v.nbytes) for v in mx.load(str(folder / "model.safetensors")).values())
    source = GOLDENS["fixtures"][fixture]["source"]
    float_bytes = sum(v.nbytes for v in mx.load(str(ROOT.parent / source / "model.safetensors")).values())
    held = resident_bytes_of(folder)
    assert 0.9 * file_bytes <= held <= 1.25 * file_bytes, (held, file_bytes, float_bytes)
    assert held < 0.5 * float_bytes

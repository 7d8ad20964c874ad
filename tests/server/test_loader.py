"""loader.load: settings arrive as parameters and reach the model; the loaded model is typed by its mode."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mlxrunner import loader
from mlxrunner.detect import Mode
from mlxrunner.errors import ModelError
from mlxrunner.models import Embedder, ImageModel, TextModel

FIXTURES = Path(__file__).parents[1] / "fixtures"
ZIMAGE = FIXTURES / "zimage-tiny"
QWEN3 = FIXTURES / "llm" / "qwen3-tiny"


def test_release_text_encoder_reaches_the_image_pipeline():
    assert loader.load(str(ZIMAGE), release_text_encoder=True).image_model.release_text_encoder is True
    assert loader.load(str(ZIMAGE)).image_model.release_text_encoder is False


def test_an_image_model_is_warmed_up_before_load_returns(caplog):
    """/health says ready when load returns: the first request must find the kernels and buffers made."""
    with caplog.at_level("INFO", logger="mlxrunner.loader"):
        loader.load(str(ZIMAGE))
    warm_ups = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up:")]
    side = 64 if mx.default_device() == mx.cpu else 1024
    assert len(warm_ups) == 1 and warm_ups[0].startswith(f"warm-up: a {side}x{side} image in 1 step took ")


def test_memory_limit_is_what_the_memory_check_compares_against():
    previous = mx.get_memory_limit()
    try:
        with pytest.raises(ModelError, match="insufficient memory for this embedding model: need 86 MB, have 1 MB"):
            loader.load("all-minilm", memory_limit=1 << 20)
        assert loader.load("all-minilm", memory_limit=1 << 20, skip_memory_check=True).mode is Mode.EMBEDDING
    finally:
        mx.set_memory_limit(previous)


def test_the_loaded_model_is_typed_by_its_mode():
    image = loader.load(str(ZIMAGE))
    assert isinstance(image.image_model, ImageModel)
    with pytest.raises(TypeError, match=r"is not an embedding model \(its mode: imagegen\)"):
        image.embedder  # noqa: B018

    llm = loader.load(str(QWEN3))
    assert isinstance(llm.text_model, TextModel)
    assert llm.embedder is llm.text_model  # an LLM serves /embedding with its decoder embeddings

    bert = loader.load("all-minilm")
    assert isinstance(bert.embedder, Embedder)
    with pytest.raises(TypeError, match="not a text-generation model"):
        bert.text_model  # noqa: B018

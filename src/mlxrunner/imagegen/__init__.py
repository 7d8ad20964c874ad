"""Image generation: `load_pipeline(name_or_path)` -> a pipeline with `.generate(prompt, ...)`.

    from mlxrunner.imagegen import load_pipeline
    pipe = load_pipeline("path/to/Z-Image-Turbo")
    image = pipe.generate("a red fox in snow", width=1024, height=1024, seed=0)
"""

from __future__ import annotations

from typing import Callable

from mlxrunner.errors import Cancelled
from mlxrunner.imagegen.pipeline import GeneratedImage, ImagePipeline


def pipeline_class(source, architecture: str) -> type[ImagePipeline]:
    """The pipeline class that serves a detected image model (detect.IMAGE_PIPELINES); nothing is loaded."""
    from mlxrunner.errors import ModelError

    if architecture in ("ZImagePipeline", "FluxPipeline"):
        # Ollama labelled its Z-Image imports "FluxPipeline"; check it really is one.
        if architecture == "FluxPipeline" and not _is_zimage(source):
            raise ModelError(f"{source.location}: FLUX.1 pipelines are not supported (only Z-Image folders "
                             "labelled FluxPipeline, as Ollama writes them)")
        from mlxrunner.imagegen.zimage import ZImagePipeline

        return ZImagePipeline
    if architecture == "Flux2KleinPipeline":
        from mlxrunner.imagegen.flux2_klein import Flux2KleinPipeline

        return Flux2KleinPipeline
    raise ModelError(f"{architecture} is recognised but not served by this version of mlxrunner yet")


def build_pipeline(source, architecture: str, progress: Callable[[float], None] | None = None,
                   release_text_encoder: bool = False,
                   denoise_queue_depth: int | None = None, low_memory: bool = False) -> ImagePipeline:
    """The pipeline for a detected image model (detect.IMAGE_PIPELINES)."""
    return pipeline_class(source, architecture)(source, progress, release_text_encoder=release_text_encoder,
                                                denoise_queue_depth=denoise_queue_depth, low_memory=low_memory)


def _is_zimage(source) -> bool:
    if not source.has_file("transformer/config.json"):
        return False
    config = source.read_json("transformer/config.json")
    return config.get("_class_name") == "ZImageTransformer2DModel" or "cap_feat_dim" in config


def load_pipeline(name_or_path: str, models_dir: str | None = None, release_text_encoder: bool = False,
                  progress: Callable[[float], None] | None = None,
                  denoise_queue_depth: int | None = None, low_memory: bool = False) -> ImagePipeline:
    """Load an image model by folder path, Ollama model name or embedded name."""
    from mlxrunner import store
    from mlxrunner.detect import Mode, detect
    from mlxrunner.errors import ModelError

    source = store.resolve(name_or_path, models_dir)
    detected = detect(source)
    if detected.mode is not Mode.IMAGEGEN:
        raise ModelError(f"{source.location} is a {detected.mode.value} model, not an image model")
    return build_pipeline(source, detected.architecture, progress, release_text_encoder, denoise_queue_depth,
                          low_memory)


__all__ = ["load_pipeline", "build_pipeline", "pipeline_class", "ImagePipeline", "GeneratedImage", "Cancelled"]

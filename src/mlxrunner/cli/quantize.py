"""`mlxrunner quantize SRC DST --bits 4|8`: a float LLM -> an mlx-lm folder (the work is mlxrunner.quantize), a
float image model -> a quantized diffusers folder (mlxrunner.quantize_image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlxrunner.cli.common import fail
from mlxrunner.errors import ModelError
from mlxrunner.progress import ProgressBar
from mlxrunner.quantize import Recipe, float_llm, quantize_model, recipe
from mlxrunner.quantize_image import float_image_folder, image_tensor_count, quantize_image_model
from mlxrunner.store.quant import MLX_MODES


def quantize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxrunner quantize", allow_abbrev=False,
        description="Quantize a float LLM (a folder or an Ollama model name) into an mlx-lm folder that both "
                    "mlxrunner and mlx-lm load, or a float image model (a diffusers folder: Z-Image, FLUX.2 Klein) "
                    "into a quantized diffusers folder.")
    parser.add_argument("src", help="the float model: a folder or an Ollama model name")
    parser.add_argument("dst", type=Path, help="the folder to write (new, or empty)")
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True)
    parser.add_argument("--group-size", type=int, help="affine: 32, 64 (default) or 128; fixed for the fp modes")
    parser.add_argument("--mode", choices=tuple(MLX_MODES), default="affine")
    parser.add_argument("--mixed", action="store_true",
                        help="LLMs: more bits for lm_head and some v_proj/down_proj layers (mlx-lm's mixed recipes)")
    parser.add_argument("--text-encoder-bits", type=int, choices=(8,),
                        help="image models: the text encoder at 8 bits while the transformer gets --bits 4 "
                             "(default: as --bits)")
    parser.add_argument("--models-dir", help="Ollama model store (default: $OLLAMA_MODELS or ~/.ollama/models)")
    return parser


def main(argv: list[str]) -> int:
    args = quantize_parser().parse_args(argv)
    try:
        chosen = recipe(args.bits, args.group_size, args.mode, args.mixed)
        image = float_image_folder(args.src, args.models_dir)
        if image is not None:
            return quantize_image(image, args, chosen)
        if args.text_encoder_bits is not None:
            raise ModelError("--text-encoder-bits is for image models")
        source = float_llm(args.src, args.models_dir)
        tensors = source.tensors("")
        with ProgressBar("quantize", len(tensors)) as bar:
            params = quantize_model(source, tensors, args.dst, chosen, bar.update)
    except ModelError as exc:
        return fail(str(exc))
    bits = "/".join(str(b) for b in sorted({p.bits for p in params.values()}))
    print(f"wrote {args.dst}: {len(params)} weights quantized ({chosen.base.mode}, {bits} bits, "
          f"group size {chosen.base.group_size})")
    return 0


def quantize_image(source, args: argparse.Namespace, chosen: Recipe) -> int:
    """The image-model branch of main (ModelError propagates to it)."""
    if chosen.mixed:
        raise ModelError("--mixed is for LLMs; image models always get Ollama's 8-bit promotions in 4-bit modes")
    with ProgressBar("quantize", image_tensor_count(source)) as bar:
        params = quantize_image_model(source, args.dst, chosen.base, args.text_encoder_bits, bar.update)
    for component, chosen_params in params.items():
        bits = "/".join(str(b) for b in sorted({p.bits for p in chosen_params.values()}))
        print(f"{component}: {len(chosen_params)} weights quantized ({bits} bits)")
    print(f"wrote {args.dst}: {chosen.base.mode}, group size {chosen.base.group_size}")
    return 0

"""`mlxrunner generate --model NAME --prompt TEXT -o out.png`: make one image and write it as PNG."""

from __future__ import annotations

import argparse
import logging

from mlxrunner import backend
from mlxrunner.cli.common import add_image_model_flags, add_model_flags, fail, load_model, settings_from
from mlxrunner.detect import Mode
from mlxrunner.http.protocol import Limits
from mlxrunner.progress import ProgressBar

log = logging.getLogger("mlxrunner")


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner generate", allow_abbrev=False,
                                     description="Generate one image with an image model and write it as PNG.")
    add_model_flags(parser)
    parser.add_argument("--prompt", "-p", required=True, help="what to draw")
    parser.add_argument("--output", "-o", default="image.png", help="PNG file to write (default image.png)")
    parser.add_argument("--width", type=int, help="pixels (default 1024, or the first --image's width); "
                        "rounded down to the model's multiple")
    parser.add_argument("--height", type=int, help="pixels (default 1024, or the first --image's height); "
                        "rounded down likewise")
    parser.add_argument("--steps", type=int, help="denoising steps = transformer evaluations (default: the model's)")
    parser.add_argument("--seed", type=int, help="any 64-bit integer (default: random; printed)")
    parser.add_argument("--negative-prompt", help="what to steer away from (models with true CFG)")
    parser.add_argument("--guidance", type=float, help="CFG scale, diffusers' guidance_scale (models with true CFG)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="reference image for editing (repeatable; models that edit)")
    add_image_model_flags(parser)
    return parser


def main(argv: list[str]) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    settings = settings_from(args, parser)
    try:
        backend.import_mlx()  # first: a clear error if MLX cannot start, before the image code imports it
    except backend.BackendError as exc:
        return fail(str(exc))
    from mlxrunner.imagegen import images as image_io

    try:
        references = []
        for path in args.image:
            try:
                blob = open(path, "rb").read()
            except OSError as exc:
                return fail(f"--image {path}: {exc.strerror or exc}")
            references.append(image_io.decode_image(blob, path, Limits()))
        with ProgressBar("loading", total=100) as bar:
            # One image: a warm-up would only add its own time.
            loaded = load_model(settings, lambda p: bar.update(int(p * 100)), warm_up=False)
        if loaded.mode is not Mode.IMAGEGEN:
            return fail(f"{settings.model} is a {loaded.mode.value} model, not an image model")
        bar = None

        def progress(step: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = ProgressBar("denoising", total=total).__enter__()
            bar.update(step)

        try:
            result = loaded.image_model.run(args.prompt, width=args.width, height=args.height, steps=args.steps,
                                            seed=args.seed, negative_prompt=args.negative_prompt,
                                            guidance=args.guidance, images=references or None, progress=progress)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        with open(args.output, "wb") as out:
            out.write(image_io.png_bytes(result.image, result.png_text(args.prompt)))
    except KeyboardInterrupt:
        return fail("interrupted")
    except Exception as exc:
        log.debug("generate failed", exc_info=True)
        return fail(str(exc))
    note = f" (ignored: {', '.join(result.ignored)})" if result.ignored else ""
    steps = f"{result.steps} step" + ("s" if result.steps != 1 else "")
    print(f"wrote {args.output}: {result.width}x{result.height}, {steps}, seed {result.seed}, "
          f"{result.timings['total']:.2f}s{note}")
    return 0

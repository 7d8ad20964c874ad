"""`mlxrunner generate --model NAME PROMPT`: an image model draws one image and writes it as PNG; an LLM streams
its answer to stdout, then the speed and peak memory to stderr (cli/text.py).

The prompt comes as an argument, `-p/--prompt` or stdin (cli/common.py). Which flags apply depends on the
model, found from its files before any weight is read: a flag for the other kind of model is a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlxrunner import backend
from mlxrunner.cli import text
from mlxrunner.cli.common import (
    add_image_model_flags,
    add_model_flags,
    add_prompt_flags,
    fail,
    find_model,
    load_with_bar,
    prompt_from,
    settings_from,
)
from mlxrunner.detect import Mode
from mlxrunner.errors import ModelError
from mlxrunner.progress import ProgressBar
from mlxrunner.request import Limits
from mlxrunner.settings import Settings

log = logging.getLogger("mlxrunner")

DEFAULT_OUTPUT = "image.png"
# The flags of one kind of model (argparse dests); given for the other kind, they are a usage error.
IMAGE_FLAGS = ("output", "width", "height", "steps", "negative_prompt", "guidance", "image")
TEMPLATE_FLAGS = ("system", "no_think")  # LLM flags that only mean something through the chat template
LLM_FLAGS = ("raw", "system", *text.THINKING_FLAGS, *(f for f in text.SAMPLING_FLAGS if f != "seed"))


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner generate", allow_abbrev=False,
                                     description="An image model draws one image and writes it as PNG; an LLM "
                                     "answers the prompt on stdout, then prints its speed on stderr.")
    add_model_flags(parser)
    add_prompt_flags(parser, "what to draw, or what to ask")
    image = parser.add_argument_group("image models")
    image.add_argument("--output", "-o", help=f"PNG file to write (default {DEFAULT_OUTPUT})")
    image.add_argument("--width", type=int, help="pixels (default 1024, or the first --image's width); "
                       "rounded down to the model's multiple")
    image.add_argument("--height", type=int, help="pixels (default 1024, or the first --image's height); "
                       "rounded down likewise")
    image.add_argument("--steps", type=int, help="denoising steps = transformer evaluations (default: the model's)")
    image.add_argument("--negative-prompt", help="what to steer away from (models with true CFG)")
    image.add_argument("--guidance", type=float, help="CFG scale, diffusers' guidance_scale (models with true CFG)")
    image.add_argument("--image", action="append", default=[], metavar="PATH",
                       help="reference image for editing (repeatable; models that edit)")
    add_image_model_flags(image)
    llm = parser.add_argument_group("LLMs")
    llm.add_argument("--raw", action="store_true", default=None,
                     help="send the prompt as it is, without the model's chat template (a model without one "
                     "always gets the raw prompt)")
    llm.add_argument("--system", metavar="TEXT", help="system prompt (through the chat template)")
    llm.add_argument("--format", metavar="json|SCHEMA.json",
                     help="hold the answer to one JSON object: any (json), or one the JSON schema in this file allows")
    text.add_thinking_flags(parser)
    text.add_sampling_flags(parser)
    parser.add_argument("--seed", type=int, help="the same seed and prompt give the same image or text; images: "
                        "any 64-bit integer (default: random, printed); LLMs: default unseeded")
    return parser


def main(argv: list[str]) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    prompt = prompt_from(args, parser)
    settings = settings_from(args, parser)
    try:
        backend.import_mlx()  # first: a clear error if MLX cannot start, before the model code imports it
        _, mode = find_model(settings)
    except (backend.BackendError, ModelError) as exc:
        return fail(str(exc))
    if mode is Mode.EMBEDDING:
        return fail(f"{settings.model} is an embedding model: generate takes image models and LLMs "
                    "(use mlxrunner embed)")
    other_flags = LLM_FLAGS if mode is Mode.IMAGEGEN else IMAGE_FLAGS
    misplaced = [f"--{f.replace('_', '-')}" for f in other_flags if getattr(args, f) not in (None, [])]
    if misplaced:
        this, other = ("an image model", "an LLM") if mode is Mode.IMAGEGEN else ("an LLM", "an image model")
        parser.error(f"{', '.join(misplaced)}: for {other}, and {settings.model} is {this}")
    if mode is Mode.LLM:
        return generate_text(args, parser, settings, prompt)
    return generate_image(args, settings, prompt)


def generate_text(args: argparse.Namespace, parser: argparse.ArgumentParser, settings: Settings,
                  prompt: str) -> int:
    """Stream the LLM's answer to stdout, through its chat template unless --raw (or it has none)."""
    from mlxrunner.text.chat_template import InvalidMessages, TemplateError

    options = text.options_from(args, parser)
    json_schema = text.json_schema_from(args.format, parser)
    try:
        model = load_with_bar(settings).text_model
        if args.raw or model.chat_template is None:
            needing = [f"--{f.replace('_', '-')}" for f in TEMPLATE_FLAGS if getattr(args, f) is not None]
            if needing:
                return fail(f"{' and '.join(needing)} need{'s' if len(needing) == 1 else ''} the chat template: "
                            + ("leave out --raw" if args.raw else f"{settings.model} has none"))
            target, reply_parser, stop_ids = prompt, None, ()
        else:
            messages = [{"role": "user", "content": prompt}]
            if args.system is not None:
                messages.insert(0, {"role": "system", "content": args.system})
            target, reply_parser = text.templated_prompt(model, messages, text.template_kwargs(args))
            stop_ids = model.chat_template.eos_token_ids
        writer = text.ReplyWriter(sys.stdout, show_thinking=not args.hide_thinking)
        reply = text.stream_reply(model, target, options, writer, parser=reply_parser, stop_token_ids=stop_ids,
                                  json_output=args.format is not None, json_schema=json_schema)
    except KeyboardInterrupt:
        print(flush=True)
        return fail("interrupted")
    except (InvalidMessages, TemplateError) as exc:
        return fail(f"the model's chat template refused the prompt: {exc}")
    except Exception as exc:
        log.debug("generate failed", exc_info=True)
        return fail(str(exc))
    print(flush=True)
    text.print_stats(reply.completion)
    return 0


def generate_image(args: argparse.Namespace, settings: Settings, prompt: str) -> int:
    from mlxrunner.imagegen import images as image_io

    output = args.output or DEFAULT_OUTPUT
    try:
        references = []
        for path in args.image:
            try:
                blob = open(path, "rb").read()
            except OSError as exc:
                return fail(f"--image {path}: {exc.strerror or exc}")
            references.append(image_io.decode_image(blob, path, Limits()))
        loaded = load_with_bar(settings, warm_up=False)  # one image: a warm-up would only add its own time
        bar = None

        def progress(step: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = ProgressBar("denoising", total=total).__enter__()
            bar.update(step)

        try:
            result = loaded.image_model.run(prompt, width=args.width, height=args.height, steps=args.steps,
                                            seed=args.seed, negative_prompt=args.negative_prompt,
                                            guidance=args.guidance, images=references or None, progress=progress)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        with open(output, "wb") as out:
            out.write(image_io.png_bytes(result.image, result.png_text(prompt)))
    except KeyboardInterrupt:
        return fail("interrupted")
    except Exception as exc:
        log.debug("generate failed", exc_info=True)
        return fail(str(exc))
    note = f" (ignored: {', '.join(result.ignored)})" if result.ignored else ""
    steps = f"{result.steps} step" + ("s" if result.steps != 1 else "")
    print(f"wrote {output}: {result.width}x{result.height}, {steps}, seed {result.seed}, "
          f"{result.timings['total']:.2f}s{note}")
    return 0

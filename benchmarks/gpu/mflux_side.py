"""mflux as a third side of the full-size image benchmark, in its own process.

    python -m benchmarks.gpu.mflux_side --model zimage|klein --folder DIR --width 1024 --height 1024 \
        --steps N --latents FILE.npy --rounds 3 --out FILE.json [--reference IMAGE.png] [--image-out OUT.png]

mflux (filipstrand/mflux on GitHub, 0.24.0 from PyPI) loads the same diffusers-format folder that the other
sides load: its `ZImageTurbo` / `Flux2Klein` (`Flux2KleinEdit` with --reference) take `model_path=DIR`, read
transformer/, text_encoder/, vae/ (*.safetensors, diffusers / transformers key names, mapped by mflux's own
weight mappings) and tokenizer/ (transformers AutoTokenizer / Qwen2TokenizerFast). mflux's architectures are
fixed at the released sizes (Z-Image-Turbo, FLUX.2-klein-4B); any vocabulary size loads.

Each round calls mflux's own `generate_image`, unchanged, with three hooks:
- the initial noise: mflux draws it with mx.random from a seed; the hook returns the --latents array instead
  (diffusers' `latents=` layout converted to mflux's: Z-Image [1,16,h,w] -> [16,1,h,w]; Klein's patchified
  [1,128,h,w] is mflux's own pre-pack layout), cast to bf16 as mflux's own draw is;
- phase timing: the text encoder call (Klein edit: and the reference image's VAE encode) and the VAE decode
  are wrapped, their outputs evaluated and the clock read between mx.synchronize() calls; denoise is the time
  from the end of the encode to the start of the decode (mflux evaluates the latents after every step);
- Z-Image's sigma schedule: mflux shifts its sigmas by a resolution-dependent mu (exp(1.15) ~ 3.16 at 1024^2);
  the folder's scheduler (Z-Image-Turbo's: static shift 3.0) is given to mflux through its own ModelConfig
  fields (sigma_base_shift = sigma_max_shift = ln(shift)), so it runs the same sigmas as the other sides.
  Klein's schedule (empirical mu) already matches diffusers'. This changes no cost.

Writes JSON (the process always exits 0; a failure is recorded under "error").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import time
import traceback
from pathlib import Path

import numpy as np

PROMPT = "a red fox in fresh snow at golden hour, 35mm photo, shallow depth of field"  # as image_bench.py
SEED = 0


class Clock:
    """Accumulates synchronized wall time per phase and remembers phase boundaries."""

    def __init__(self, mx):
        self.mx = mx
        self.reset()

    def reset(self) -> None:
        self.spent = {"encode": 0.0, "decode": 0.0}
        self.encode_end = None
        self.decode_start = None

    def wrap(self, fn, phase: str):
        mx = self.mx

        def timed(*a, **k):
            mx.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            arrays = [x for x in (out if isinstance(out, tuple) else (out,)) if isinstance(x, mx.array)]
            mx.eval(*arrays)
            mx.synchronize()
            t1 = time.perf_counter()
            self.spent[phase] += t1 - t0
            if phase == "encode":
                self.encode_end = t1
            elif self.decode_start is None:
                self.decode_start = t0
            return out

        return timed


def folder_sigma_shift(folder: Path) -> tuple[float, float] | None:
    """(base_shift, max_shift) in mflux's ModelConfig terms for the folder's scheduler, or None to keep mflux's."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if cfg.get("use_dynamic_shifting"):
        return float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
    shift = float(cfg.get("shift", 1.0))
    return math.log(shift), math.log(shift)


def load(args, mx):
    if args.model == "zimage":
        from mflux.models.common.config.model_config import ModelConfig
        from mflux.models.z_image.variants import ZImageTurbo

        config = copy.copy(ModelConfig.z_image_turbo())
        shift = folder_sigma_shift(Path(args.folder))
        if shift is not None:
            config.sigma_base_shift, config.sigma_max_shift = shift
        return ZImageTurbo(model_path=args.folder, model_config=config)
    if args.reference:
        from mflux.models.flux2.variants import Flux2KleinEdit

        return Flux2KleinEdit(model_path=args.folder)
    from mflux.models.flux2.variants import Flux2Klein

    return Flux2Klein(model_path=args.folder)


def install_hooks(args, model, clock, noise):
    """Noise injection and phase timers (see the module docstring). Returns the generate callable."""
    mx = clock.mx
    if args.model == "zimage":
        from mflux.models.z_image.latent_creator import ZImageLatentCreator

        if noise is not None:
            expected = (1, 16, args.height // 8, args.width // 8)
            if tuple(noise.shape) != expected:
                raise ValueError(f"--latents shape {tuple(noise.shape)}, expected {expected}")
            mflux_noise = ZImageLatentCreator.pack_latents(mx.array(noise), args.height, args.width)  # [16,1,h,w]
            mflux_noise = mflux_noise.astype(ModelPrecision.get())
            ZImageLatentCreator.create_noise = staticmethod(lambda seed, height, width: mflux_noise)
        model._encode_prompts = clock.wrap(model._encode_prompts, "encode")
        model._decode_latents = clock.wrap(model._decode_latents, "decode")

        def generate():
            return model.generate_image(seed=SEED, prompt=args.prompt, num_inference_steps=args.steps,
                                        height=args.height, width=args.width)

        return generate

    from mflux.models.flux2.latent_creator.flux2_latent_creator import Flux2LatentCreator

    if noise is not None:
        expected = (1, 128, args.height // 16, args.width // 16)
        if tuple(noise.shape) != expected:
            raise ValueError(f"--latents shape {tuple(noise.shape)}, expected {expected}")
        mflux_noise = mx.array(noise).astype(ModelPrecision.get())  # mflux's pre-pack layout: the same
        original = Flux2LatentCreator.prepare_latents

        def prepare_latents(seed, height, width, batch_size, num_latents_channels=32, vae_scale_factor=8):
            latents, ids, lh, lw = original(seed=seed, height=height, width=width, batch_size=batch_size,
                                            num_latents_channels=num_latents_channels,
                                            vae_scale_factor=vae_scale_factor)
            if tuple(latents.shape) != tuple(mflux_noise.shape):
                raise ValueError(f"mflux's latents {tuple(latents.shape)} vs --latents {tuple(mflux_noise.shape)}")
            return mflux_noise, ids, lh, lw

        Flux2LatentCreator.prepare_latents = staticmethod(prepare_latents)
    model._encode_prompt_pair = clock.wrap(model._encode_prompt_pair, "encode")
    model.vae.decode_packed_latents = clock.wrap(model.vae.decode_packed_latents, "decode")
    if args.reference:
        from mflux.models.flux2.variants.edit.flux2_klein_edit_helpers import _Flux2KleinEditHelpers

        # The reference image's VAE encode is conditioning work: counted as encode (as on the diffusers side).
        # It runs after the text encode, so encode_end moves past it.
        _Flux2KleinEditHelpers.prepare_reference_image_conditioning = staticmethod(
            clock.wrap(_Flux2KleinEditHelpers.prepare_reference_image_conditioning, "encode"))

        def generate():
            return model.generate_image(seed=SEED, prompt=args.prompt, num_inference_steps=args.steps,
                                        height=args.height, width=args.width, image_paths=[args.reference])

        return generate

    def generate():
        return model.generate_image(seed=SEED, prompt=args.prompt, num_inference_steps=args.steps,
                                    height=args.height, width=args.width)

    return generate


class ModelPrecision:
    @staticmethod
    def get():
        from mflux.models.common.config.model_config import ModelConfig

        return ModelConfig.precision


def run(args, record: dict) -> None:
    import mflux  # noqa: F401
    import mlx.core as mx

    try:
        from importlib.metadata import version

        record["version"] = version("mflux")
    except Exception:  # noqa: BLE001
        record["version"] = None
    record["versions"] = {"mlx": mx.__version__, "mflux": record["version"]}

    noise = np.load(args.latents) if args.latents else None
    if noise is None:
        record["notes"].append("no --latents: mflux's own seeded noise (seed 0), so no cross-side image check")
    if args.model == "zimage" and args.reference:
        record["notes"].append("--reference ignored: Z-Image is text-to-image only")

    clock = Clock(mx)
    mx.synchronize()
    t0 = time.perf_counter()
    model = load(args, mx)
    mx.eval(model.parameters())  # mflux loads lazily from safetensors: read the weights now, as the others do
    mx.synchronize()
    record["load_s"] = time.perf_counter() - t0
    save(args, record)
    print(f"[mflux] loaded in {record['load_s']:.1f} s", flush=True)
    if args.model == "zimage":
        record["notes"].append(
            f"Z-Image sigmas: mflux's shift set from the folder's scheduler_config "
            f"(mu base/max = {model.model_config.sigma_base_shift:.6f}/{model.model_config.sigma_max_shift:.6f})")
    generate = install_hooks(args, model, clock, noise)

    def one():
        clock.reset()
        mx.synchronize()
        start = time.perf_counter()
        result = generate()
        image = np.asarray(result.image.convert("RGB"))
        mx.synchronize()
        total = time.perf_counter() - start
        if clock.encode_end is None or clock.decode_start is None:
            raise RuntimeError("a phase hook was not called: mflux's generate_image changed")
        return total, clock.spent["encode"], clock.decode_start - clock.encode_end, clock.spent["decode"], image

    def record_round(key: str) -> None:
        total, encode, denoise, decode, image = one()
        record[key].append({"total": total, "encode": encode, "denoise": denoise, "decode": decode})
        summarize(record)
        save(args, record)  # a later time limit keeps what finished
        print(f"[mflux] {key}: {total:.2f} s (encode {encode:.2f}, denoise {denoise:.2f}, decode {decode:.2f})",
              flush=True)
        if args.image_out:
            from PIL import Image

            Image.fromarray(image).save(args.image_out)

    # warm-up (mx.compile traces; mflux re-creates its compiled predict each call, as a user's run does)
    record_round("warmup")
    mx.reset_peak_memory()
    for _ in range(args.rounds):
        record_round("rounds")
        record["peak_gpu_bytes"] = int(mx.get_peak_memory())
    save(args, record)


def summarize(record: dict) -> None:
    """Medians in image_bench's keys (total_s, encode_s, ...). Only a warm-up finished (a time limit):
    its figures, flagged: a first call includes MLX's compile traces, so it overstates mflux's time."""
    rows = record["rounds"] or record["warmup"]
    record["from_warmup_only"] = not record["rounds"]
    for key in ("total", "encode", "denoise", "decode"):
        record[f"{key}_s"] = statistics.median(r[key] for r in rows)


def save(args, record: dict) -> None:
    Path(args.out).write_text(json.dumps(record, indent=1))


class TimeLimit(Exception):
    pass


def on_sigterm(signum, frame):  # `timeout` sends SIGTERM: record what finished, then stop
    raise TimeLimit("stopped by the time limit (SIGTERM) before all rounds finished")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["zimage", "klein"], required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--latents", help=".npy initial noise in diffusers' latents= layout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", help="Klein: a reference image (edit mode, Flux2KleinEdit)")
    parser.add_argument("--image-out")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args(argv)
    # Local folder only: nothing is to be downloaded (mflux would try the Hub for a repo id).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    record = {"peer": "mflux", "version": None, "model": args.model, "width": args.width, "height": args.height,
              "steps": args.steps, "edit": bool(args.reference and args.model == "klein"),
              "warmup": [], "rounds": [], "peak_gpu_bytes": None,
              "load_s": None, "error": None, "notes": []}
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run(args, record)
    except BaseException as exc:  # noqa: BLE001  one failing peer must not stop the run: recorded, exit 0
        if isinstance(exc, KeyboardInterrupt):
            raise
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
        print(record["traceback"], flush=True)
    save(args, record)
    print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Goldens for the first-block step cache: diffusers 0.42.1's own FirstBlockCache hooks run on the tiny
Z-Image pipeline (tests/fixtures/zimage-tiny), for the parity tests in tests/parity/test_step_cache_parity.py.

Usage (from the repository root, with the side venv that has torch + diffusers):

    .goldens/bin/python scripts/goldens_step_cache.py [--goldens-dir tests/goldens/step_cache]

diffusers' hooks find a block's input by the parameter name `hidden_states`; ZImageTransformerBlock
calls it `x`, so `apply_first_block_cache` refuses it as it is. Each main layer is therefore wrapped in
`HiddenStatesBlock` (which only renames that argument) and registered as a one-output block; the cache
logic that runs is diffusers' own. ZImagePipeline sets no cache context, so one is set for the whole run.
(FLUX.2 Klein has no such reference: diffusers 0.42.1's FirstBlockCache fails on Flux2Transformer2DModel,
whose last, single-stream block returns the joint text + image sequence while its head block's output
is the image stream alone.)

Writes <goldens-dir>/reference.safetensors ("<case>/init_latents", "<case>/final_latents") and
reference.json (prompts, steps, thresholds, which steps ran in full, the relative change at every step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import ZImagePipeline  # noqa: E402
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache  # noqa: E402
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry  # noqa: E402
from diffusers.hooks.first_block_cache import FBCHeadBlockHook  # noqa: E402
from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "zimage-tiny"
DEFAULT_GOLDENS_DIR = REPO_ROOT / "tests" / "goldens" / "step_cache"

# The tiny random model's first-block residual changes by 1.06-1.39x between steps (diffusers' default
# threshold is 0.05), so its thresholds are large; no step's change may lie within 0.2 % of one (float32 on
# two frameworks differs by ~1e-5), so the same steps are skipped here and in the runner.
CASES = {
    "zimage_t2i": dict(prompt="a red fox in the snow", negative_prompt=None, guidance=0.0, steps=30,
                       threshold=1.2, size=64, seed=11),
    "zimage_cfg": dict(prompt="a lighthouse at night", negative_prompt="blurry", guidance=4.0, steps=30,
                       threshold=1.25, size=64, seed=12),
}


class HiddenStatesBlock(torch.nn.Module):
    """A Z-Image block whose input argument is called hidden_states, as diffusers' cache hooks look it up."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, *args, **kwargs):
        return self.block(hidden_states, *args, **kwargs)


TransformerBlockRegistry.register(HiddenStatesBlock, TransformerBlockMetadata(return_hidden_states_index=0,
                                                                               return_encoder_hidden_states_index=None))


def run_case(pipe: ZImagePipeline, spec: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    transformer = pipe.transformer
    blocks = list(transformer.layers)
    transformer.layers = torch.nn.ModuleList(HiddenStatesBlock(b) for b in blocks)
    computed: list[int] = []
    changes: list[float] = []
    # The tail block's own forward runs only when the remaining blocks are computed.
    tail_hook = blocks[-1].register_forward_hook(lambda *_: computed.append(1))
    should_compute = FBCHeadBlockHook._should_compute_remaining_blocks

    def logged(self, residual):
        state = self.state_manager.get_state()
        if state.head_block_residual is not None:
            last = state.head_block_residual
            changes.append(float(((residual - last).abs().mean() / last.abs().mean()).item()))
        return should_compute(self, residual)

    FBCHeadBlockHook._should_compute_remaining_blocks = logged
    try:
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=spec["threshold"]))
        _set_cache_context(transformer, CacheContext("run"))
        size = spec["size"]
        init = np.random.default_rng(spec["seed"]).standard_normal((1, 16, size // 8, size // 8)).astype(np.float32)
        steps_before = []
        calls = {"n": 0}

        def count(*_):
            calls["n"] += 1
            steps_before.append(len(computed))

        head_hook = blocks[0].register_forward_hook(count)
        latents = pipe(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], height=size, width=size,
                       num_inference_steps=spec["steps"], guidance_scale=spec["guidance"],
                       latents=torch.from_numpy(init.copy()), output_type="latent").images
        head_hook.remove()
    finally:
        FBCHeadBlockHook._should_compute_remaining_blocks = should_compute
        tail_hook.remove()
    # Step i ran in full when the tail ran between head call i and head call i + 1.
    marks = steps_before + [len(computed)]
    computed_steps = [i for i in range(calls["n"]) if marks[i + 1] > marks[i]]
    margin = min(abs(c - spec["threshold"]) / spec["threshold"] for c in changes)
    assert margin > 0.002, (f"a step's change is within {margin:.2%} of the threshold: pick another; changes: "
                             f"{sorted(round(c, 4) for c in changes)}")
    assert 0 < len(computed_steps) < spec["steps"], "the case should both compute and skip steps"
    meta = dict(spec, computed_steps=computed_steps, computed=len(computed_steps),
                skipped=spec["steps"] - len(computed_steps), changes=changes, threshold_margin=margin)
    return meta, init, latents.float().numpy()


def main(goldens_dir: Path = DEFAULT_GOLDENS_DIR) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    store, cases = {}, {}
    for name, spec in CASES.items():
        # A fresh pipeline per case: HookRegistry caches its child registries, stale once the hooks go.
        pipe = ZImagePipeline.from_pretrained(str(FIXTURE), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        meta, init, final = run_case(pipe, spec)
        store[f"{name}/init_latents"], store[f"{name}/final_latents"] = init, np.ascontiguousarray(final)
        cases[name] = meta
        print(f"  [{name}] computed {meta['computed']} of {spec['steps']} steps: {meta['computed_steps']}")
    goldens_dir.mkdir(parents=True, exist_ok=True)
    save_file(store, str(goldens_dir / "reference.safetensors"))
    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    weights = {str(path.relative_to(FIXTURE)): hashlib.sha256(path.read_bytes()).hexdigest()
               for path in sorted(FIXTURE.glob("*/*.safetensors"))}
    meta = {"versions": versions, "fixture": "tests/fixtures/zimage-tiny", "weights_sha256": weights, "cases": cases}
    (goldens_dir / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goldens-dir", type=Path, default=DEFAULT_GOLDENS_DIR)
    main(parser.parse_args().goldens_dir)

"""Z-Image numerics against diffusers 0.42.1 (goldens from scripts/goldens_zimage.py; no torch here).

Float32 on CPU with the initial latents injected: token ids, prompt embeddings, the first two
transformer calls, the sigma schedule, the final latents (rel. error <= 1e-4) and the decoded
image (<= 1 level of 255), for text-to-image at three sizes (two non-square, with image pad
tokens) and CFG (prompts of different padded lengths: the key-mask path; and the default ""
negative). Plus the VAE alone, diffusers' tiled decode, a truncated 512-token prompt and a bf16 run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import float32_tol
from image_helpers import computing_as_stored, convert_folder_to_bf16, rel_error
from safetensors.numpy import load_file

from mlxrunner import _core
from mlxrunner.imagegen import load_pipeline

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"
GOLDENS = Path(__file__).parents[1] / "goldens" / "zimage"
FLOAT32_CASES = ["t2i_64x96", "t2i_80x48", "t2i_128x128", "cfg_64x64", "cfg_default_negative_64x64"]
REL_TOL = float32_tol(1e-4, 1e-2)  # CUDA (TF32): up to 2.2e-3 measured on an H100
PIXEL_TOL = float32_tol(1, 8)  # levels of 255
# Share of pixels allowed off (by at most PIXEL_TOL): on the CPU only values on a rounding edge;
# under TF32 up to 20 % of the pixels moved by a level or a few (H100).
OFF_PIXELS = float32_tol(0.01, 0.3)


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDENS / "reference.safetensors"))


@pytest.fixture(scope="module")
def meta():
    return json.loads((GOLDENS / "reference.json").read_text())["cases"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(FIXTURE))


def run_case(pipe, case: dict, latents):
    return pipe.run(case["prompt"], width=case["width"], height=case["height"], steps=case["steps"],
                    guidance=case["guidance_scale"], negative_prompt=case.get("negative_prompt"), latents=latents)


@pytest.mark.parametrize("name", FLOAT32_CASES + ["encode_long"])
def test_prompt_tokens_and_embeddings(pipe, golden, meta, name):
    ids, truncated = pipe.prompt_ids(meta[name]["prompt"])
    assert ids == golden[f"{name}/input_ids"].tolist()
    assert truncated == (name == "encode_long")
    assert rel_error(pipe.encode_prompt(meta[name]["prompt"]), golden[f"{name}/prompt_embeds"]) <= REL_TOL
    if f"{name}/negative_prompt_embeds" in golden:
        negative = meta[name].get("negative_prompt") or ""
        assert rel_error(pipe.encode_prompt(negative), golden[f"{name}/negative_prompt_embeds"]) <= REL_TOL


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_sigma_schedule(pipe, golden, meta, name):
    case = meta[name]
    sigmas = np.array(pipe.sigmas(case["steps"], case["width"], case["height"]), np.float32)
    np.testing.assert_array_equal(sigmas, golden[f"{name}/sigmas"])
    np.testing.assert_array_equal(sigmas[:-1] * np.float32(1000), golden[f"{name}/timesteps"])


@pytest.mark.parametrize("name", FLOAT32_CASES)
@pytest.mark.parametrize("step", [0, 1])
def test_transformer_call(pipe, golden, name, step):
    x = golden[f"{name}/step{step}_input"][:, :, 0]  # drop the frame axis
    captions = [mx.array(golden[f"{name}/prompt_embeds"])]
    if x.shape[0] == 2:  # CFG: one batch of [positive, negative], as diffusers runs it
        captions.append(mx.array(golden[f"{name}/negative_prompt_embeds"]))
    out = pipe.transformer.forward(mx.array(x), mx.array(golden[f"{name}/step{step}_timestep"]), captions)
    assert rel_error(out, golden[f"{name}/step{step}_output"][:, :, 0]) <= REL_TOL


def test_cfg_case_really_has_captions_of_different_padded_lengths(golden):
    # Otherwise the key-mask path would go untested.
    lengths = [len(golden[f"cfg_64x64/{k}"]) for k in ("input_ids", "negative_input_ids")]
    assert len({(n + 31) // 32 for n in lengths}) == 2, lengths


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_final_latents_and_image(pipe, golden, meta, name):
    result = run_case(pipe, meta[name], golden[f"{name}/init_latents"])
    assert rel_error(result.latents, golden[f"{name}/final_latents"]) <= REL_TOL
    pixels = np.asarray(result.image).astype(int)
    expected = golden[f"{name}/image_uint8"].astype(int)
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).max() <= PIXEL_TOL
    assert (pixels != expected).mean() < OFF_PIXELS  # off-by-one only where a value sits on a rounding edge
    image_float = pipe.vae.decode_float(mx.array(result.latents))
    np.testing.assert_allclose(image_float, golden[f"{name}/image_float"], atol=float32_tol(1e-4, 1e-2))


def test_vae_decoder_alone(pipe, golden):
    image = pipe.vae.decode_float(mx.array(golden["vae_decode/latents"]))
    np.testing.assert_allclose(image, golden["vae_decode/image_float"].transpose(1, 2, 0),
                               atol=float32_tol(2e-5, 2e-2))


def test_tiled_vae_decode_matches_diffusers_tiled_decode(pipe, golden, meta):
    latents = mx.array(golden["vae_decode_tiled/latents"])
    tiled = pipe.vae.decode_float(latents, tile=meta["vae_decode_tiled"]["tile_latents"])
    np.testing.assert_allclose(tiled, golden["vae_decode_tiled/image_float"].transpose(1, 2, 0),
                               atol=float32_tol(2e-5, 2e-2))
    # And tiling is not a no-op: it differs from the untiled decode of the same latents.
    assert np.abs(tiled - pipe.vae.decode_float(latents, tile=0)).max() > 1e-3


def test_bfloat16_pipeline_within_bf16_tolerance(tmp_path, golden, meta):
    bf16_dir = tmp_path / "zimage-tiny-bf16"
    convert_folder_to_bf16(FIXTURE, bf16_dir)
    with computing_as_stored():
        pipe16 = load_pipeline(str(bf16_dir))
    assert pipe16.transformer.dtype == mx.bfloat16
    result = run_case(pipe16, meta["bf16_64x96"], golden["bf16_64x96/init_latents"])
    # bf16 carries ~3 significant digits; diffusers' own bf16 run is 0.7 % from its float32 one.
    assert rel_error(result.latents, golden["bf16_64x96/final_latents"]) <= 3e-2
    diff = np.abs(np.asarray(result.image).astype(int) - golden["bf16_64x96/image_uint8"].astype(int))
    assert diff.max() <= 12 and diff.mean() <= 1.5


def test_denoise_loop_directly_from_core(pipe, golden, meta):
    """`_core.zimage_denoise` is usable without the Python pipeline: same final latents."""
    case = meta["t2i_64x96"]
    steps_seen = []
    final = _core.zimage_denoise(pipe.transformer, mx.array(golden["t2i_64x96/init_latents"]),
                                 pipe.sigmas(case["steps"], case["width"], case["height"]),
                                 mx.array(golden["t2i_64x96/prompt_embeds"]), None, 0.0,
                                 lambda step, total: steps_seen.append((step, total)))
    assert rel_error(final, golden["t2i_64x96/final_latents"]) <= REL_TOL
    assert steps_seen == [(i, case["steps"]) for i in range(case["steps"] + 1)]


@pytest.mark.parametrize("name", ["t2i_64x96", "cfg_64x64"])
def test_denoise_is_bit_identical_at_every_evaluation_queue_depth(pipe, golden, meta, name):
    """The loop evaluates block by block with at most queue_depth blocks queued (0: no bound): the graph is
    the same, so the latents must be too, with and without guidance."""
    case = meta[name]
    negative = mx.array(golden[f"{name}/negative_prompt_embeds"]) if case["cfg"] else None
    finals = []
    for depth in (0, 1, 2, 5):
        finals.append(np.asarray(_core.zimage_denoise(
            pipe.transformer, mx.array(golden[f"{name}/init_latents"]),
            pipe.sigmas(case["steps"], case["width"], case["height"]), mx.array(golden[f"{name}/prompt_embeds"]),
            negative, case["guidance_scale"], None, queue_depth=depth)))
    assert all(np.array_equal(finals[0], other) for other in finals[1:])
    assert rel_error(finals[0], golden[f"{name}/final_latents"]) <= REL_TOL


@pytest.mark.parametrize("shape", [(), (1, 16, 8), (1, 3, 8, 8), (1, 16, 7, 8)])
@pytest.mark.parametrize("cfg", [False, True])
def test_bad_latents_given_to_the_core_loop_are_a_value_error_naming_the_shape(pipe, golden, shape, cfg):
    negative = mx.array(golden["cfg_64x64/negative_prompt_embeds"]) if cfg else None
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, H, W\].*got \["):
        _core.zimage_denoise(pipe.transformer, mx.zeros(shape), pipe.sigmas(2, 64, 64),
                             mx.array(golden["cfg_64x64/prompt_embeds"]), negative, 3.0 if cfg else 0.0, None)


@pytest.mark.parametrize("depth", [-1, -2])
def test_a_bad_queue_depth_is_named(pipe, golden, meta, depth):
    case = meta["t2i_64x96"]
    with pytest.raises(ValueError, match=f"queue_depth must be >= 0 \\(0: unbounded\\), got {depth}"):
        _core.zimage_denoise(pipe.transformer, mx.array(golden["t2i_64x96/init_latents"]),
                             pipe.sigmas(case["steps"], case["width"], case["height"]),
                             mx.array(golden["t2i_64x96/prompt_embeds"]), None, 0.0, None, queue_depth=depth)


def test_progress_returning_false_cancels(pipe, golden, meta):
    case = meta["t2i_64x96"]
    calls = []

    def stop_after_one(step, total):
        calls.append(step)
        return step < 1

    final = _core.zimage_denoise(pipe.transformer, mx.array(golden["t2i_64x96/init_latents"]),
                                 pipe.sigmas(case["steps"], case["width"], case["height"]),
                                 mx.array(golden["t2i_64x96/prompt_embeds"]), None, 0.0, stop_after_one)
    assert final is None and calls == [0, 1]


def test_progress_exception_propagates_out_of_the_loop(pipe, golden, meta):
    class Stop(Exception):
        pass

    def boom(step, total):
        if step == 2:
            raise Stop("from the callback")

    case = meta["t2i_64x96"]
    with pytest.raises(Stop, match="from the callback"):
        pipe.run(case["prompt"], width=case["width"], height=case["height"], steps=case["steps"], guidance=0.0,
                 latents=golden["t2i_64x96/init_latents"], progress=boom)

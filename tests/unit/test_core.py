"""mlxrunner._core: mx.array in, mx.array out, and the building blocks against NumPy."""

import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import float32_tol

from mlxrunner import _core


def test_mx_array_crosses_the_boundary_both_ways():
    # Catches a nanobind ABI mismatch with mlx.core: it would reject the mx.array argument.
    x = mx.array([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    y = _core.gelu(x)
    assert isinstance(y, mx.array)
    assert y.shape == x.shape and y.dtype == mx.float32
    expected = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in [-2.0, -0.5, 0.0, 0.5, 3.0]]
    np.testing.assert_allclose(np.array(y)[0], expected, rtol=1e-6, atol=1e-7)


def test_core_links_the_same_mlx_as_python():
    assert _core.mlx_version == mx.__version__


def test_linear_matches_numpy():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 3, 8)), rng.normal(size=(5, 8)), rng.normal(size=(5,))
    out = _core.linear(mx.array(x, mx.float32), mx.array(w, mx.float32), mx.array(b, mx.float32))
    tol = float32_tol(1e-5, 5e-3)  # TF32 on CUDA: 1.1e-3 measured
    np.testing.assert_allclose(np.array(out), x @ w.T + b, rtol=tol, atol=tol)
    no_bias = _core.linear(mx.array(x, mx.float32), mx.array(w, mx.float32))
    np.testing.assert_allclose(np.array(no_bias), x @ w.T, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len"])
def test_pooling_ignores_padding(mode):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int32)
    out = np.array(_core.pool(mx.array(hidden), mx.array(mask), mode))
    for row in range(2):
        n = mask[row].sum()
        tokens = hidden[row, :n]
        expected = {"mean": tokens.mean(0), "cls": hidden[row, 0], "max": tokens.max(0),
                    "mean_sqrt_len": tokens.sum(0) / math.sqrt(n)}[mode]
        np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-6)


def test_unknown_pooling_is_a_value_error():
    with pytest.raises(ValueError, match="unsupported pooling 'median'"):
        _core.pool(mx.zeros((1, 2, 3)), mx.ones((1, 2)), "median")


def test_l2_normalize_matches_torch_semantics():
    x = mx.array([[3.0, 4.0], [0.0, 0.0]])
    out = np.array(_core.l2_normalize(x))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)  # zero rows stay zero (eps 1e-12)


def _tiny_bert_weights(config, dtype=mx.float32):
    h, i = config.hidden_size, config.intermediate_size
    rng = np.random.default_rng(2)

    def t(*shape):
        return mx.array(rng.normal(scale=0.1, size=shape), dtype)

    w = {"embeddings.word_embeddings.weight": t(config.vocab_size, h),
         "embeddings.position_embeddings.weight": t(config.max_position_embeddings, h),
         "embeddings.token_type_embeddings.weight": t(config.type_vocab_size, h),
         "embeddings.LayerNorm.weight": t(h), "embeddings.LayerNorm.bias": t(h)}
    for layer in range(config.num_hidden_layers):
        p = f"encoder.layer.{layer}."
        for name, (o, n) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                             "attention.self.value": (h, h), "attention.output.dense": (h, h),
                             "intermediate.dense": (i, h), "output.dense": (h, i)}.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = t(o, n), t(o)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + norm + ".weight"], w[p + norm + ".bias"] = t(h), t(h)
    return w


def _tiny_config():
    c = _core.BertConfig()
    c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads = 50, 16, 2, 4
    c.intermediate_size, c.max_position_embeddings = 32, 12
    return c


def test_bert_load_names_the_missing_tensor():
    config = _tiny_config()
    weights = _tiny_bert_weights(config)
    del weights["encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(ValueError, match=r"missing weight encoder\.layer\.1\.attention\.self\.key\.bias"):
        _core.BertEncoder(config, weights)


def test_bert_load_names_a_tensor_with_the_wrong_shape():
    config = _tiny_config()
    weights = _tiny_bert_weights(config)
    weights["encoder.layer.0.intermediate.dense.weight"] = mx.zeros((31, 16))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight has shape \[31, 16\], "
                                         r"expected \[32, 16\]"):
        _core.BertEncoder(config, weights)


def test_bert_padding_does_not_change_the_result():
    config = _tiny_config()
    encoder = _core.BertEncoder(config, _tiny_bert_weights(config))
    ids = mx.array([[1, 5, 7, 2]], mx.int32)
    alone = encoder.embed(ids, mx.ones((1, 4), mx.int32), "mean", True)
    padded_ids = mx.array([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]], mx.int32)
    padded_mask = mx.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], mx.int32)
    batched = encoder.embed(padded_ids, padded_mask, "mean", True)
    np.testing.assert_allclose(np.array(batched)[0], np.array(alone)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_bert_sequences_without_padding_are_the_padded_batch(pooling, dtype):
    """embed_sequences runs float32 sequences back to back without padding (each attending to itself) and pads the
    others: either way each vector is the padded batch's."""
    config = _tiny_config()
    encoder = _core.BertEncoder(config, _tiny_bert_weights(config, dtype))
    sequences = [[1, 5, 7, 2, 9, 3], [1, 9, 2], [4], [1, 8, 8, 8, 2]]
    ids = np.zeros((4, 6), np.int32)
    mask = np.zeros((4, 6), np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, 1
    padded = np.array(encoder.embed(mx.array(ids), mx.array(mask), pooling, True))
    unpadded = np.array(encoder.embed_sequences(sequences, pooling, True))
    tolerance = 1e-5 if dtype == mx.float32 else 1e-2
    np.testing.assert_allclose(unpadded, padded, rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="at least one token"):
        encoder.embed_sequences([[1, 2], []], pooling, True)
    with pytest.raises(ValueError, match="longer than the model's 12 positions"):
        encoder.embed_sequences([list(range(13))], pooling, True)


def test_bert_rejects_inputs_longer_than_its_positions():
    config = _tiny_config()
    encoder = _core.BertEncoder(config, _tiny_bert_weights(config))
    with pytest.raises(ValueError, match="longer than the model's 12 positions"):
        encoder.forward(mx.zeros((1, 13), mx.int32), mx.ones((1, 13), mx.int32))


def test_bert_keeps_bfloat16_weights():
    config = _tiny_config()
    encoder = _core.BertEncoder(config, _tiny_bert_weights(config, mx.bfloat16))
    hidden = encoder.forward(mx.array([[1, 2, 3]]), mx.ones((1, 3), mx.int32))
    assert hidden.dtype == mx.bfloat16
    pooled = encoder.embed(mx.array([[1, 2, 3]]), mx.ones((1, 3), mx.int32), "mean", True)
    assert pooled.dtype == mx.float32


def test_flux2_latent_layouts_invert_each_other():
    z = mx.array(np.random.default_rng(3).normal(size=(1, 3, 6, 8)).astype(np.float32))
    patches = _core.flux2_patchify(z)
    assert patches.shape == (1, 12, 3, 4)
    # channel c * 4 + dy * 2 + dx holds pixel (2y + dy, 2x + dx) of channel c
    np.testing.assert_array_equal(np.array(patches)[0, 2 * 4 + 1 * 2 + 0], np.array(z)[0, 2, 1::2, 0::2])
    np.testing.assert_array_equal(np.array(_core.flux2_unpatchify(patches)), np.array(z))
    tokens = _core.flux2_pack(patches)
    assert tokens.shape == (1, 12, 12)
    np.testing.assert_array_equal(np.array(_core.flux2_unpack(tokens, 3, 4)), np.array(patches))
    ids = np.array(_core.flux2_image_ids(3, 4, 10))
    assert ids.dtype == np.int32 and ids.shape == (12, 4)
    assert ids[5].tolist() == [10, 1, 1, 0]  # row-major: token 5 is (y 1, x 1)


@pytest.mark.parametrize("call, message", [
    (lambda: _core.flux2_patchify(mx.zeros((1, 3, 5, 8))), r"patchify takes \[B, C, H, W\] .* got \[1, 3, 5, 8\]"),
    (lambda: _core.flux2_unpatchify(mx.zeros((1, 6, 2, 2))), r"unpatchify .* C a multiple of 4"),
    (lambda: _core.flux2_unpack(mx.zeros((1, 11, 4)), 3, 4), r"unpack takes tokens \[B, 3 \* 4, C\], got \[1, 11, 4\]"),
])
def test_flux2_latent_layouts_name_a_bad_shape(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Run in a subprocess: the loops are chosen once per process (MLXRUNNER_CPU_LOOPS caps them).
CONVOLVE_UNDER_LOOPS = """
import sys
from mlxrunner import _core  # first: MLX's matmuls on OpenBLAS, as in this process
import mlx.core as mx
import numpy as np
shape, out_channels, kernel, padding = eval(sys.argv[1])
x = mx.random.normal(shape, key=mx.random.key(5))
weight = mx.random.normal((out_channels, kernel, kernel, shape[3]), key=mx.random.key(6))
np.save(sys.argv[2], np.asarray(_core.conv2d_cpu(x, weight, padding)))
print(_core.cpu_loops())
"""


def convolve_under_loops(loops: str, case: tuple, tmp_path) -> tuple[np.ndarray, str]:
    out = tmp_path / f"{loops}.npy"
    env = {**os.environ, "MLXRUNNER_CPU_LOOPS": loops}
    ran = subprocess.run([sys.executable, "-c", CONVOLVE_UNDER_LOOPS, repr(case), str(out)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    return np.load(out), ran.stdout.strip()


@pytest.mark.parametrize("case", [
    ((2, 17, 9, 5), 7, 3, 1), ((1, 20, 20, 8), 7, 3, 0), ((1, 8, 8, 4), 3, 1, 0),  # one product, one thread
    ((1, 64, 48, 32), 7, 3, 1), ((3, 33, 31, 19), 13, 3, 1),  # bands on every core
    ((1, 256, 256, 32), 3, 3, 1),  # the VAE's last convolution: 3 output channels, the most bands
])
def test_the_baseline_cpu_convolution_is_mlxs_own_bit_for_bit(case, tmp_path):
    """A CPU without AVX2 (the baseline loops): im2col and the sgemm MLX's own convolution makes, in bands of rows on
    every core, exactly mx.conv2d's numbers, in one product or in bands."""
    ours, loops = convolve_under_loops("baseline", case, tmp_path)
    assert loops == "baseline"
    shape, out_channels, kernel, padding = case
    x = mx.random.normal(shape, key=mx.random.key(5))
    weight = mx.random.normal((out_channels, kernel, kernel, shape[3]), key=mx.random.key(6))
    np.testing.assert_array_equal(ours, np.asarray(mx.conv2d(x, weight, (1, 1), (padding, padding))))


@pytest.mark.parametrize("case", [((1, 40, 52, 64), 32, 3, 1), ((1, 64, 64, 32), 3, 3, 1), ((2, 17, 13, 5), 7, 3, 1)])
def test_the_avx2_and_avx512_convolutions_are_the_same_bits(case, tmp_path):
    """The AVX-512 block (12 pixels x 16 outputs) sums each output in the AVX2 block's order: the same numbers. (On a
    CPU without AVX-512 both runs take the AVX2 loops, and this holds trivially.)"""
    avx2, avx2_loops = convolve_under_loops("avx2", case, tmp_path)
    best, best_loops = convolve_under_loops("avx512", case, tmp_path)
    assert avx2_loops in ("avx2", "baseline") and best_loops in ("avx512", avx2_loops)
    np.testing.assert_array_equal(avx2, best)


def test_a_bad_cpu_loops_setting_is_named():
    ran = subprocess.run([sys.executable, "-c", "from mlxrunner import _core\n_core.cpu_loops()"],
                         env={**os.environ, "MLXRUNNER_CPU_LOOPS": "sse9"}, capture_output=True, text=True, timeout=60)
    assert ran.returncode != 0 and "MLXRUNNER_CPU_LOOPS: expected baseline, avx2 or avx512, got 'sse9'" in ran.stderr


def within_float32_sums(ours: mx.array, theirs: mx.array) -> None:
    """The same convolution summed in another order: each output within a few float32 roundings of its terms."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6 * np.abs(theirs).max())


@pytest.mark.parametrize("shape, out_channels, kernel, padding", [
    ((1, 8, 8, 4), 16, 3, 1),  # one block row, on one thread
    ((2, 17, 13, 5), 32, 3, 1), ((1, 20, 23, 8), 16, 3, 0), ((1, 21, 19, 6), 16, 5, 2),  # rows not a multiple of 6
    ((1, 96, 96, 64), 64, 3, 1), ((1, 32, 40, 256), 128, 3, 1),  # deep: sgemm sums those in blocks of the depth
    ((2, 17, 9, 5), 7, 3, 1), ((1, 8, 8, 4), 3, 1, 0), ((3, 33, 31, 19), 13, 3, 1), ((1, 96, 96, 64), 24, 3, 1),
    ((1, 256, 256, 32), 3, 3, 1),  # output channels not a multiple of 16: the last panel padded; the VAE's last conv
])
def test_the_direct_cpu_convolution_is_mlxs_within_float32_rounding(shape, out_channels, kernel, padding):
    """An AVX2 or AVX-512 CPU: the direct convolution (no im2col, nn/cpu_kernels.cpp), each output's multiply-adds
    in tap order as sgemm makes them within one block of the depth."""
    x = mx.random.normal(shape, key=mx.random.key(5))
    weight = mx.random.normal((out_channels, kernel, kernel, shape[3]), key=mx.random.key(6))
    within_float32_sums(_core.conv2d_cpu(x, weight, padding), mx.conv2d(x, weight, (1, 1), (padding, padding)))


def test_the_cpu_convolution_holds_no_side_buffer_of_the_inputs_size():
    x = mx.random.normal((1, 96, 96, 64), key=mx.random.key(3))
    weight = mx.random.normal((64, 3, 3, 64), key=mx.random.key(4))
    mx.eval(x, weight)

    def peak_over_inputs(convolve) -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(convolve())
        return mx.get_peak_memory() - before

    plain = peak_over_inputs(lambda: mx.conv2d(x, weight, (1, 1), (1, 1)))
    ours = peak_over_inputs(lambda: _core.conv2d_cpu(x, weight, 1))
    assert ours <= x.nbytes + 4096 < 0.2 * plain, (ours, plain)  # the output (x's size here) and nothing else


def test_the_cpu_convolution_names_a_bad_shape():
    with pytest.raises(ValueError, match=r"square weight \[O, k, k, C\]"):
        _core.conv2d_cpu(mx.zeros((1, 8, 8, 4)), mx.zeros((2, 3, 3, 5)), 1)
    with pytest.raises(ValueError, match="no output for this input"):
        _core.conv2d_cpu(mx.zeros((1, 2, 2, 4)), mx.zeros((2, 5, 5, 4)), 0)


@pytest.mark.parametrize("shape, out_channels", [((1, 40, 36, 16), 16), ((2, 17, 9, 5), 7), ((1, 128, 128, 32), 32),
                                                  ((1, 24, 30, 64), 32)])
def test_the_cpu_convolutions_bias_residual_and_upsampling_are_mlxs_ops(shape, out_channels):
    """The VAE's convolution epilogues in the product's pass: + bias, residual + that (a ResnetBlock's output), and
    the upsampler's conv over a nearest-2x input read without the 4x copy: MLX's ops' numbers (within the product's
    float32 rounding where the convolution is the direct one)."""
    x = mx.random.normal(shape, key=mx.random.key(7))
    weight = mx.random.normal((out_channels, 3, 3, shape[3]), key=mx.random.key(8))
    bias = mx.random.normal((out_channels,), key=mx.random.key(9))
    plain = mx.conv2d(x, weight, (1, 1), (1, 1))
    residual = mx.random.normal(plain.shape, key=mx.random.key(10))
    within_float32_sums(_core.conv2d_cpu(x, weight, 1, bias=bias), plain + bias)
    within_float32_sums(_core.conv2d_cpu(x, weight, 1, bias=bias, residual=residual), residual + (plain + bias))
    b, h, w, c = shape
    upsampled = mx.broadcast_to(x.reshape(b, h, 1, w, 1, c), (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    within_float32_sums(_core.conv2d_cpu(x, weight, 1, bias=bias, upsample_2x=True),
                        mx.conv2d(upsampled, weight, (1, 1), (1, 1)) + bias)


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS routing and its warning are Linux's (macOS: Accelerate)")
def test_importing_mlx_first_warns_that_cpu_matmuls_stay_on_the_reference_blas():
    def stderr_of(code: str, **env: str) -> str:
        ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        assert ran.returncode == 0, ran.stderr
        return ran.stderr

    warned = stderr_of("import mlx.core\nimport mlxrunner\nassert mlxrunner.cpu_blas == 'reference'")
    assert "RuntimeWarning: mlx.core was imported before mlxrunner" in warned and "import mlxrunner first" in warned
    routed = stderr_of("import mlxrunner\nimport mlx.core\nassert mlxrunner.cpu_blas == 'openblas'",
                       MLXRUNNER_CPU_BLAS="openblas")
    assert "RuntimeWarning" not in routed
    assert "RuntimeWarning" not in stderr_of("import mlx.core\nimport mlxrunner", MLXRUNNER_CPU_BLAS="reference")

"""Quantized layers where MLX's CUDA kernels differ from its CPU ones (checked on whatever device runs the tests).

- Affine 2/3-bit weights in groups of 128 fail on CUDA with float32 activations once 33+ rows are in
  flight; such layers compute in bfloat16 there. A 64-token prompt through 2- and 3-bit g128 `down_proj`s
  must match the float model holding the exactly dequantized weights (on the CPU: to float32 precision;
  on CUDA: to bfloat16 activation precision).
- 1-bit weights: the CPU runs them; on CUDA loading refuses them, naming the tensor.
- Packed weights taller than 16,384 rows (a tied vocabulary head): one row (decode) and a prefill give the
  dequantized model's logits (a row-block split of such weights once gave wrong logits on CUDA).
- A Linear's product with packed weights for 1 to 8 rows (on CUDA our tensor-core kernel takes them,
  nn/cuda_matvec): x @ dequantize(W).T for 4 and 8 bits, groups of 32/64/128, tall and wide weights, and an
  input that starts off a 16-byte boundary; and rows of a single group (which MLX's Hopper kernel gets wrong).
- A packed model's prefill (from 512 rows its layers multiply transient dequantized copies) holds a few layers'
  copies at its peak, not the model's: the decoder waits for each layer before queuing the one after next.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

from mlxrunner import _core
from mlxrunner.errors import ModelError
from mlxrunner.llm import load

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"
ON_CUDA = ON_GPU and mx.cuda.is_available()
PROMPT = [(7 * i + 3) % 500 for i in range(64)]  # 64 rows: past the 33 where the CUDA kernel failed


def quantized_down_projs(out: Path, bits: int, group_size: int) -> tuple[Path, Path]:
    """Two copies of the tiny Qwen3: `quant` with every down_proj packed (affine, `bits`, `group_size`; mlx-lm's
    folder format), and `float` holding exactly the weights `quant` dequantizes to."""
    weights = mx.load(str(QWEN3 / "model.safetensors"))
    quant, dequantized = dict(weights), dict(weights)
    overrides = {}
    for name, value in weights.items():
        if not name.endswith("mlp.down_proj.weight"):
            continue
        with mx.stream(mx.cpu):
            packed, scales, biases = mx.quantize(value, group_size=group_size, bits=bits)
            exact = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
        module = name.removesuffix(".weight")
        quant.update({name: packed, f"{module}.scales": scales, f"{module}.biases": biases})
        dequantized[name] = exact
        overrides[module] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config = json.loads((QWEN3 / "config.json").read_text())
    folders = {}
    for kind, tensors in (("quant", quant), ("float", dequantized)):
        folder = out / kind
        shutil.copytree(QWEN3, folder)
        mx.save_safetensors(str(folder / "model.safetensors"), tensors)
        if kind == "quant":  # the global entry quantizes only modules with scales; the overrides say how
            data = {**config, "quantization": {"group_size": group_size, "bits": bits, "mode": "affine",
                                               **overrides}}
            (folder / "config.json").write_text(json.dumps(data))
        folders[kind] = folder
    return folders["quant"], folders["float"]


@pytest.mark.parametrize("bits", [2, 3])
def test_affine_low_bit_group_128_runs_a_long_prompt(tmp_path, bits):
    quant, dequantized = quantized_down_projs(tmp_path, bits, 128)
    got = load(str(quant)).logits(PROMPT)
    want = load(str(dequantized)).logits(PROMPT)
    assert got.shape == (len(PROMPT), 503) and np.isfinite(got).all()
    scale = float(np.abs(want).max())
    tolerance = 2e-2 if ON_CUDA else 1e-4  # bfloat16 activations on CUDA, float32 on the CPU
    assert float(np.abs(got - want).max()) <= tolerance * scale


def test_one_bit_weights_run_on_the_cpu_and_are_refused_on_cuda(tmp_path):
    quant, dequantized = quantized_down_projs(tmp_path, 1, 64)
    if ON_CUDA:
        with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: 1-bit quantization "
                                             r"does not run on CUDA"):
            load(str(quant))
        return
    got = load(str(quant)).logits(PROMPT)
    want = load(str(dequantized)).logits(PROMPT)
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


def test_a_tall_packed_head_decodes_one_row_in_blocks(tmp_path):
    """A 40,000-row tied head, past the 16,384 rows of MLX's CUDA matrix-vector kernel: every device must give
    the dequantized model's logits for one row (decode) and for a prefill."""
    weights = mx.load(str(QWEN3 / "model.safetensors"))
    mx.random.seed(3)
    weights["model.embed_tokens.weight"] = 0.02 * mx.random.normal((40_000, 64))
    config = {**json.loads((QWEN3 / "config.json").read_text()), "vocab_size": 40_000}
    tall = tmp_path / "tall"
    shutil.copytree(QWEN3, tall)
    mx.save_safetensors(str(tall / "model.safetensors"), weights)
    (tall / "config.json").write_text(json.dumps(config))
    quant, dequantized = quantized_embedding(tall, tmp_path)
    for prompt in ([11], PROMPT):  # one row (decode), then a prefill
        got = load(str(quant)).logits(prompt)
        want = load(str(dequantized)).logits(prompt)
        assert got.shape == (len(prompt), 40_000)
        tolerance = 2e-3 if ON_CUDA else 1e-4
        assert float(np.abs(got - want).max()) <= tolerance * float(np.abs(want).max())


def quantized_embedding(folder: Path, out: Path) -> tuple[Path, Path]:
    """`folder` with its (tied) embedding packed at 4 bits, group 64, and the float copy it dequantizes to."""
    weights = mx.load(str(folder / "model.safetensors"))
    with mx.stream(mx.cpu):
        packed, scales, biases = mx.quantize(weights["model.embed_tokens.weight"], group_size=64, bits=4)
        exact = mx.dequantize(packed, scales, biases, group_size=64, bits=4)
    config = json.loads((folder / "config.json").read_text())
    quant, dequantized = out / "quant-head", out / "float-head"
    for target, tensors, extra in (
            (quant, {**weights, "model.embed_tokens.weight": packed, "model.embed_tokens.scales": scales,
                     "model.embed_tokens.biases": biases},
             {"quantization": {"group_size": 64, "bits": 4, "mode": "affine"}}),
            (dequantized, {**weights, "model.embed_tokens.weight": exact}, {})):
        shutil.copytree(folder, target)
        mx.save_safetensors(str(target / "model.safetensors"), tensors)
        (target / "config.json").write_text(json.dumps({**config, **extra}))
    return quant, dequantized


@pytest.mark.parametrize(("rows", "cols", "bits", "group_size"), [
    (3000, 256, 4, 64), (40_000, 128, 4, 32), (96, 1024, 8, 128), (512, 384, 8, 32), (1000, 640, 4, 128),
    (40_000, 64, 4, 64), (48, 64, 8, 64), (2560, 9728, 4, 64)])  # the last: few tiles, 16 warps each
@pytest.mark.parametrize("batch", [1, 3, 7, 8])
def test_a_packed_linear_of_a_few_rows_is_the_dequantized_product(rows, cols, bits, group_size, batch):
    # bfloat16 on CUDA, as checkpoints run there (what our kernel takes); float32 elsewhere, where MLX's CPU
    # kernel sums bfloat16 in bfloat16 (off by ~5 % at these widths).
    dtype = mx.bfloat16 if ON_CUDA else mx.float32
    mx.random.seed(rows + cols + batch)
    packed, scales, biases = mx.quantize(0.05 * mx.random.normal((rows, cols)), group_size=group_size, bits=bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    exact = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group_size, "mode": "affine"})
    # One input as its own array; for our kernel's row counts also one that starts 3 elements into a buffer (off
    # a 16-byte boundary: MLX 0.32.4's tiled CUDA kernel, at 8+ rows, fails on such an input, "misaligned address").
    flat = mx.random.normal((batch * cols + 3,)).astype(dtype)
    inputs = [flat[:batch * cols].reshape(batch, cols)]
    if batch <= _core.MATVEC_MAX_ROWS:
        inputs.append(flat[3:].reshape(batch, cols))
    for x in inputs:
        got = np.array(_core.quantized_linear(x, packed, scales, biases, spec).astype(mx.float32))
        want = np.array(x.astype(mx.float32) @ exact.T)
        assert got.shape == (batch, rows)
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()  # bfloat16's ~3 significant digits


@pytest.mark.parametrize(("intermediate", "cols", "bits", "group_size"), [
    (9728, 2560, 4, 64), (1000, 640, 4, 128), (44, 256, 8, 32), (3, 512, 4, 64)])
@pytest.mark.parametrize("batch", [1, 5, 8, 9])
def test_a_packed_gate_and_up_give_the_gated_silu_of_their_product(intermediate, cols, bits, group_size, batch):
    """The gated MLP's activation from its stacked [gate; up] weight: on CUDA up to 8 rows run it in the product's
    kernel, which must give the numbers of the product followed by the separate gated SiLU, bit for bit."""
    dtype = mx.bfloat16 if ON_CUDA else mx.float32
    mx.random.seed(intermediate + cols + batch)
    packed, scales, biases = mx.quantize(0.05 * mx.random.normal((2 * intermediate, cols)), group_size=group_size,
                                         bits=bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group_size, "mode": "affine"})
    x = mx.random.normal((batch, cols)).astype(dtype)
    got = _core.quantized_gated_silu(x, packed, scales, biases, spec)
    product = _core.quantized_linear(x, packed, scales, biases, spec)
    want = _core.gated_silu(product[:, :intermediate], product[:, intermediate:])
    assert got.shape == (batch, intermediate) and got.dtype == dtype
    assert np.array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))
    assert float(mx.abs(want.astype(mx.float32)).max()) > 0.01  # a real signal


@pytest.mark.parametrize(("rows", "cols", "bits", "group_size", "gated"), [
    (2560 + 2 * 1024, 2560, 4, 64, False), (2 * 9728, 2560, 4, 64, True), (6144, 4096, 8, 32, False),
    (88, 256, 4, 128, True)])
@pytest.mark.parametrize("batch", [1, 4, 8])
@pytest.mark.parametrize("with_delta", [True, False])
def test_a_packed_projection_of_a_normed_sum_is_the_add_norm_then_the_product(rows, cols, bits, group_size, gated,
                                                                             batch, with_delta):
    """A decoder layer's projection of RMSNorm(x + delta): on CUDA one kernel makes the sum, the norm and the product
    (for up to 8 rows); it must give the sum exactly and the product of the separately made norm, but for the odd
    element whose norm rounds the other way (its sum of squares adds up in another order)."""
    dtype = mx.bfloat16 if ON_CUDA else mx.float32
    mx.random.seed(rows + cols + batch)
    packed, scales, biases = mx.quantize(0.05 * mx.random.normal((rows, cols)), group_size=group_size, bits=bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group_size, "mode": "affine"})
    x = mx.random.normal((batch, cols)).astype(dtype)
    delta = mx.random.normal((batch, cols)).astype(dtype) if with_delta else None
    weight = mx.random.uniform(0.5, 1.5, (cols,)).astype(dtype)
    total, got, fused = _core.quantized_normed_product(x, delta, weight, 1e-6, packed, scales, biases, spec, gated)
    assert fused == (ON_CUDA and batch * cols <= _core.MATVEC_MAX_STAGED_ELEMENTS)  # it stages x's normed rows
    want_total = x + delta if with_delta else x
    normed = mx.fast.rms_norm(want_total, weight, 1e-6)
    if gated:
        want = _core.quantized_gated_silu(normed, packed, scales, biases, spec)
    else:
        want = _core.quantized_linear(normed, packed, scales, biases, spec)
    assert np.array_equal(np.array(total.astype(mx.float32)), np.array(want_total.astype(mx.float32)))
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == want.shape == (batch, rows // 2 if gated else rows)
    assert np.mean(got == want) >= 0.95
    assert np.abs(got - want).max() <= 2 ** -6 * np.abs(want).max()



@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim", "with_norms", "bits", "group_size"), [
    (32, 8, 128, True, 4, 64),    # Qwen3-4B's attention
    (32, 8, 128, False, 4, 64),   # Llama-3-8B's
    (4, 2, 64, True, 8, 32)])
@pytest.mark.parametrize(("batch", "tokens", "offsets"), [(1, 1, [517]), (3, 1, [3, 900, 41]), (1, 5, [12])])
def test_a_packed_qkv_kernel_gives_the_heads_of_the_normed_product_and_the_qk_kernel(q_heads, kv_heads, head_dim,
                                                                                   with_norms, bits, group_size,
                                                                                   batch, tokens, offsets):
    """A decode step's q|k|v on CUDA: one kernel makes the layer's add-and-norm, the packed product and the q/k norms
    and RoPE; it must give the sum exactly, v as the product, and q and k as the q/k kernel makes them from that
    product, but for the odd element a norm rounds the other way (its sums add up in another order)."""
    cols, heads = 512, q_heads + 2 * kv_heads
    mx.random.seed(heads + batch + tokens)
    packed, scales, biases = mx.quantize(0.05 * mx.random.normal((heads * head_dim, cols)), group_size=group_size,
                                         bits=bits)
    scales, biases = scales.astype(mx.bfloat16), biases.astype(mx.bfloat16)
    spec = _core.QuantSpec.from_dict({"bits": bits, "group_size": group_size, "mode": "affine"})
    x = mx.random.normal((batch, tokens, cols)).astype(mx.bfloat16)
    delta = mx.random.normal((batch, tokens, cols)).astype(mx.bfloat16)
    weight = mx.random.uniform(0.5, 1.5, (cols,)).astype(mx.bfloat16)
    norms = (None, None)
    if with_norms:
        norms = tuple(mx.random.uniform(0.5, 1.5, (head_dim,)).astype(mx.bfloat16) for _ in range(2))
    config = _core.RopeConfig.from_dict({"rope_theta": 1_000_000.0})
    offsets = mx.array(offsets, dtype=mx.int32)
    got = _core.cuda_quantized_normed_qkv_heads(x, delta, weight, 1e-6, packed, scales, biases, spec, q_heads,
                                                kv_heads, config, offsets, *norms)
    if not ON_CUDA:
        assert got is None
        return
    total, product, _ = _core.quantized_normed_product(x, delta, weight, 1e-6, packed, scales, biases, spec, False)
    want_q, want_k, _ = _core.cuda_qkv_heads(product.reshape(batch, tokens, heads, head_dim), q_heads, kv_heads,
                                             config, offsets, *norms)
    want_v = product.reshape(batch, tokens, heads, head_dim)[:, :, q_heads + kv_heads:].transpose(0, 2, 1, 3)
    got_total, q, k, v = (np.array(a.astype(mx.float32)) for a in got)
    assert np.array_equal(got_total, np.array(total.astype(mx.float32)))
    assert np.array_equal(v, np.array(want_v.astype(mx.float32)))
    for name, got_part, want in (("q", q, want_q), ("k", k, want_k)):
        want = np.array(want.astype(mx.float32))
        assert got_part.shape == want.shape, name
        assert np.mean(got_part == want) >= 0.95, name
        assert np.abs(got_part - want).max() <= 2 ** -6 * np.abs(want).max(), name

def random_qwen3(folder: Path, layers: int, hidden: int, intermediate: int) -> Path:
    """A bf16 Qwen3 of random weights with the tiny fixture's tokenizer and vocabulary, written with MLX."""
    shutil.copytree(QWEN3, folder)
    config = json.loads((QWEN3 / "config.json").read_text())
    heads, kv_heads, head_dim = hidden // 128, hidden // 256, 128
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, head_dim=head_dim,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, dtype="bfloat16",
                  layer_types=["full_attention"] * layers)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    weights = {"model.embed_tokens.weight": 0.02 * mx.random.normal((config["vocab_size"], hidden)),
               "model.norm.weight": mx.ones((hidden,))}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            weights[f"{prefix}{name}.weight"] = mx.ones((hidden,))
        for name in ("self_attn.q_norm", "self_attn.k_norm"):
            weights[f"{prefix}{name}.weight"] = mx.ones((head_dim,))
        for name, shape in shapes.items():
            weights[f"{prefix}{name}.weight"] = 0.02 * mx.random.normal(shape)
    mx.save_safetensors(str(folder / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()})
    return folder


@pytest.mark.skipif(not ON_CUDA, reason="the many-row dequantized product and the host running ahead are CUDA's")
def test_a_packed_prefill_holds_a_few_layers_copies(tmp_path):
    """Unpaced, a 4-bit Llama-3-8B's 1,024-token prefill peaked 14.5 GB above its 4.5 GB of weights on an H200 (most
    layers' dequantized copies alive at once); paced, 1.4 GB. Here 32 layers of 30 MB dequantized each."""
    from mlxrunner.cli.quantize import main as quantize_main
    from mlxrunner.llm.model import sampler_options
    from mlxrunner.request import Options

    layers, hidden, intermediate = 32, 1024, 4096
    source = random_qwen3(tmp_path / "bf16", layers, hidden, intermediate)
    assert quantize_main([str(source), str(tmp_path / "q4"), "--bits", "4"]) == 0
    model = load(str(tmp_path / "q4"))
    mx.synchronize()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    ids = [(17 * i + 3) % 499 for i in range(1025)]
    generator = _core.Generator(model.decoder, ids, sampler_options(Options(temperature=0.0)), 2048)
    next(generator)
    mx.synchronize()
    peak = mx.get_peak_memory() - resident
    layer_copy = 2 * (3 * hidden * hidden + 3 * hidden * intermediate)  # bf16: q, o, k + v (halves), gate, up, down
    assert peak < 0.5 * layers * layer_copy, (peak, layer_copy)


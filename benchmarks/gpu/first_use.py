"""The first request after start against the ones after it, for LLM folders (quantized ones above all).

    python -m benchmarks.gpu.first_use --out FILE.json FOLDER [FOLDER ...]

On CUDA the first call of each kernel variant (quantized matmuls above all) once cost tens of seconds;
mlxrunner pays that at load (LanguageModel warms each shape generation uses). Per folder, two fresh
processes in turn (the second shows what the driver's kernel cache keeps between processes), each:
load (warm-up included: its own time is logged and parsed), then three requests of a 1,024-token prompt
and 16 greedy tokens. Reported: load seconds, warm-up seconds, and each request's seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import mlxrunner  # noqa: F401
from mlxrunner.llm import load
started = time.perf_counter()
model = load(sys.argv[1])
loaded = time.perf_counter() - started
prompt = [(17 * i + 3) % 499 for i in range(1024)]
requests = []
for _ in range(3):
    started = time.perf_counter()
    text = "".join(model.generate(prompt, num_predict=16, temperature=0, repeat_penalty=1.0))
    requests.append(time.perf_counter() - started)
print(json.dumps({"load_s": loaded, "requests_s": requests}))
"""


def one_process(folder: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    warm = re.search(r"warmed up the GPU kernels in ([0-9.]+)s", proc.stderr)
    result["warm_up_s"] = float(warm.group(1)) if warm else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    report = {}
    for folder in args.folders:
        report[folder.name] = [one_process(folder) for _ in range(2)]
        print(folder.name, json.dumps(report[folder.name]), flush=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel benchmarks whose sides run in child processes: MLX's side once, ours once per setting of a measuring switch
(read once by the C++ core, so a setting needs a fresh process). Used by chunk_attention_bench: each side runs
`python -m MODULE --child SIDE ...` and prints one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def run_child(module: str, side: str, child_args: list[str], switch: str, setting: str | None,
              timeout: int = 400) -> dict:
    """The child's JSON (its last line), or {"side", "blocks", "error"} if it failed."""
    env = dict(os.environ)
    env.pop(switch, None)
    if setting is not None:
        env[switch] = setting
    proc = subprocess.run([sys.executable, "-m", module, "--child", side, *child_args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"side": side, "blocks": setting, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sides(module: str, child_args: list[str], switch: str, settings: str, out: Path, name: str,
              markdown: Callable[[list[dict]], str]) -> int:
    """MLX's side, then ours at each comma-separated setting; OUT/NAME.json and the printed table. 0 if none failed."""
    results = [run_child(module, "mlx", child_args, switch, None)]
    results += [run_child(module, "ours", child_args, switch, s) for s in settings.split(",") if s]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0 if all("error" not in r for r in results) else 1

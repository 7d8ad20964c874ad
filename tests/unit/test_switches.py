"""The C++ core's environment switches (csrc/nn/cuda_kernel_common.h, EnvSwitch): each is read at its first use and
kept, so a forward never pays for the environment, until `_core.reread_switches()` makes every one read its variable
again: what lets a benchmark time two settings of a switch in one process (benchmarks/gpu/follow_up_slack.py
--same-process). `_core.switch_value` reads a name the way the core's own switches do. Each case runs in a fresh
interpreter, so that no other test's reads are kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, os
import mlxrunner
from mlxrunner import _core

name = "MLXRUNNER_TEST_ONLY_SWITCH"
seen = []
os.environ[name] = "5"
seen.append(_core.switch_value(name, -1))        # the first read
os.environ[name] = "7"
seen.append(_core.switch_value(name, -1))        # kept: the environment changed, the switch did not
_core.reread_switches()
seen.append(_core.switch_value(name, -1))        # read again
del os.environ[name]
seen.append(_core.switch_value(name, -1))        # kept
_core.reread_switches()
seen.append(_core.switch_value(name, -1))        # unset: the default
seen.append(_core.switch_value("MLXRUNNER_TEST_ONLY_OTHER", 3))
print(json.dumps(seen))
"""


def test_a_switch_is_kept_until_the_switches_are_read_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXRUNNER_TEST_ONLY_")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [5, 5, 7, 7, -1, 3]


def test_the_core_reads_its_switches_again_while_a_model_runs(tmp_path):
    """reread_switches between two forwards of a real decoder neither fails nor changes its output (the switches it
    reads act on CUDA only; on the CPU every value leaves the same numbers)."""
    from conftest import FIXTURES

    script = r"""
import json, os, sys
import mlxrunner
from mlxrunner import _core
from mlxrunner.llm import load

model = load(sys.argv[1])
first = model.logits([3, 4, 5, 6]).tolist()
os.environ["MLXRUNNER_EARLY_DISPATCH"] = "0"
os.environ["MLXRUNNER_CHUNK_BLOCKS"] = "7"
_core.reread_switches()
second = model.logits([3, 4, 5, 6]).tolist()
print(json.dumps({"same": first == second, "early": _core.switch_value("MLXRUNNER_EARLY_DISPATCH", 1)}))
"""
    folder = FIXTURES / "llm" / "qwen3-tiny"
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"same": True, "early": 0}

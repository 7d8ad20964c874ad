"""The C++ core's environment switches (csrc/nn/cuda_kernel_common.h, EnvSwitch): each is read at its first use and
kept, so a forward never pays for the environment, until `_core.reread_switches()` makes every one read its variable
again: what lets a benchmark time two settings of a switch in one process (benchmarks/gpu/follow_up_slack.py
--same-process, run here on the tiny Qwen3). `_core.switch_value` reads a name the way the core's own switches do.
Each case runs in a fresh interpreter, so that no other test's reads are kept. Last, every switch the code reads has
its row in docs/settings.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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


def test_the_same_process_benchmark_changes_the_switch_between_its_settings(tmp_path):
    """benchmarks/gpu/follow_up_slack.py --same-process: one process times base and a setting in turn, and the core
    reads the setting's values under it (two switches set together, NAME=VALUE,NAME=VALUE) and the process's own (here
    unset) under base."""
    out = tmp_path / "slack.json"
    names = ("MLXRUNNER_EARLY_DISPATCH", "MLXRUNNER_CHUNK_BLOCKS")
    setting = "MLXRUNNER_EARLY_DISPATCH=0,MLXRUNNER_CHUNK_BLOCKS=7"
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu.follow_up_slack", "--folder",
                           str(ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"), "--out", str(out), "--rounds", "1",
                           "--repeats", "1", "--no-probes", "--same-process", "--env", setting],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    base, switched = report["runs"]["base"][0], report["runs"][setting][0]
    assert base["switches"] == {"MLXRUNNER_EARLY_DISPATCH": -1, "MLXRUNNER_CHUNK_BLOCKS": -1}
    assert switched["switches"] == {"MLXRUNNER_EARLY_DISPATCH": 0, "MLXRUNNER_CHUNK_BLOCKS": 7}
    assert base["second_ms"] > 0 and switched["second_ms"] > 0
    assert set(report["paired_second_ms"]) == {setting}
    paired = report["paired_second_ms"][setting]
    # One process of one round: the one difference is the setting's second request minus base's.
    assert paired["rounds"] == 1 and paired["processes"] == 1
    assert paired["median"] == switched["second_rounds_ms"][0] - base["second_rounds_ms"][0]
    assert paired["faster"] == (paired["median"] < 0)


def test_the_pairing_compares_rounds_within_a_process_and_leaves_out_a_failed_one():
    """follow_up_slack.paired_rounds: round r of a setting against round r of base in the same process, pooled over the
    processes; a process that failed (its row an error) neither counts nor breaks the pairing."""
    from benchmarks.gpu.follow_up_slack import paired_rounds

    runs = {"base": [{"second_rounds_ms": [10.0, 20.0]}, {"error": "crashed"}, {"second_rounds_ms": [5.0, 5.0]}],
            "A=1": [{"second_rounds_ms": [9.0, 21.0]}, {"error": "crashed"}, {"second_rounds_ms": [4.0, 4.5]}]}
    paired = paired_rounds(runs)["A=1"]
    assert paired["rounds"] == 4 and paired["processes"] == 2
    assert paired["faster"] == 3  # -1, +1, -1, -0.5
    assert paired["median"] == -0.75


def environment_names_read(folder: Path, suffixes: tuple[str, ...]) -> set[str]:
    """The MLXRUNNER_* names quoted in a folder's sources: what the code can read from the environment."""
    names = set()
    for path in folder.rglob("*"):
        if path.suffix in suffixes:
            names |= set(re.findall(r"""["'](MLXRUNNER_[A-Z0-9_]+)["']""", path.read_text(encoding="utf-8")))
    return names


def test_every_switch_the_code_reads_is_in_the_settings_page():
    # docs/settings.md is "every knob the runner has": a switch added to the core or the Python side without its row
    # there is one a user cannot find (MLXRUNNER_HOST_INTS_BY_KERNEL and the two probes were, until session 41).
    read = environment_names_read(ROOT / "csrc", (".cpp", ".h")) | environment_names_read(
        ROOT / "src" / "mlxrunner", (".py",))
    read = {name for name in read if not name.startswith("MLXRUNNER_TEST_ONLY_")}
    assert "MLXRUNNER_CHUNK_ROPE" in read and "MLXRUNNER_LOW_MEMORY" in read  # both halves were scanned
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert sorted(name for name in read if f"`{name}`" not in page) == []

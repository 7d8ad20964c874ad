"""Which side sets the pace of the prompt cache's follow-up on a GPU, the host or the device? Time it with a known
extra cost added to one side at a time.

    python -m benchmarks.gpu.follow_up_slack --models-dir DIR --out FILE.json [--only qwen3-4b | --folder PATH]
        [--rounds 5] [--repeats 2] [--host-delay-us 40] [--gpu-spin-us 20] [--env NAME=VALUE ...] [--no-probes]
        [--same-process]

The follow-up is prompt_cache_bench's second request (a 3,000-token prompt, then it + 64 tokens, one greedy token;
ours only, `LanguageModel.stream`). Each setting runs in a fresh process, the list of settings `--repeats` times in
turn so that the machine's drift spreads over all of them:
- base: as shipped;
- host delay: MLXRUNNER_PROBE_HOST_DELAY_US=D, the host spins D µs before queuing each layer of a waited-for forward;
- GPU spin: MLXRUNNER_PROBE_GPU_SPIN_NS=S, after each layer a kernel copies the hidden state and holds each block
  S ns longer; against its control, the same kernel with S = 0 (one operation more for the host in both).
Reported per setting: the median over its processes of the median second request (ms), and two sensitivities:
host = (delay - base) / (layers x D) and GPU = (spin - control) / (layers x S). A side whose extra time shows whole
(~1) sets the pace; one whose extra time vanishes (~0) waits for the other, by about that much a layer.
`--env NAME=VALUE` adds a setting of its own (a switch under test), timed against base the same way; `--no-probes`
leaves out the three probe settings (a switch against base alone). The table also gives each setting's median first
request and the ratio of the two medians. `--same-process` runs every setting in each of `--repeats` processes instead,
in turn each round, the core's switches read again at each change (`_core.reread_switches`): the scatter between
processes on one GPU (±1 ms in session 37) is larger than one operation a layer, and this takes it out of the
comparison (a switch whose choice a kernel keeps from its first build does not change in-process). Its figure for
each setting pairs the setting's second request with base's of the same round, pooled over the processes: the median
difference, its quartiles, and how many rounds the setting won. (Pinning the processes to a few cores, `taskset -c`,
made no quieter measure in session 39: the first request slowed from 67-79 ms to 88.)

Writes the JSON and prints a markdown table. On a CPU the probes do nothing (the forward is not queued layer by
layer there): a run only checks that the script works.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

PROMPT_TOKENS, FOLLOW_UP_TOKENS = 3000, 64


def one_round(ours, first_ids: list[int], second_ids: list[int]) -> tuple[float, float]:
    """The first and the second request on an emptied cache, ms."""
    ours.clear()
    first, _, cached = ours.request(first_ids)
    assert cached == 0, cached
    second, _, cached = ours.request(second_ids)
    assert cached == PROMPT_TOKENS, cached
    return first * 1e3, second * 1e3


def child(folder: str, rounds: int, same_process: dict[str, dict[str, str]] | None = None) -> dict:
    """One process's figures: the median first and second request (ms) over `rounds` rounds on an emptied cache.

    same_process: {setting: {NAME: VALUE}}: every setting in this process instead, in turn each round (the order
    reversed every other round), the core's switches read again at each change (`_core.reread_switches`); a variable a
    setting does not name is as the process found it. Returns {setting: figures} then."""
    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)

    from benchmarks.prompt_cache_sides import Ours, prompt
    from mlxrunner import _core

    ours = Ours(Path(folder))
    first_ids = prompt(PROMPT_TOKENS)
    second_ids = first_ids + prompt(FOLLOW_UP_TOKENS, salt=7)
    chosen = same_process or {"": {}}
    names = sorted({name for env in chosen.values() for name in env})
    found = {name: os.environ.get(name) for name in names}

    def switch_to(setting: str) -> None:
        for name in names:
            value = chosen[setting].get(name, found[name])
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _core.reread_switches()

    for setting in chosen:  # warm-up of both shapes, and of each setting's kernels
        switch_to(setting)
        one_round(ours, first_ids, second_ids)  # from an emptied cache: the second request's 64 rows as timed
    times: dict[str, list[tuple[float, float]]] = {setting: [] for setting in chosen}
    for r in range(rounds):
        for setting in list(chosen) if r % 2 == 0 else list(chosen)[::-1]:
            switch_to(setting)
            times[setting].append(one_round(ours, first_ids, second_ids))
    figures = {setting: {"first_ms": statistics.median(f for f, _ in rows),
                         "second_ms": statistics.median(s for _, s in rows),
                         "second_rounds_ms": [s for _, s in rows]} for setting, rows in times.items()}
    for setting in chosen:  # what the core read under each setting (-1: unset), the check that a change took
        switch_to(setting)
        figures[setting]["switches"] = {name: _core.switch_value(name, -1) for name in names}
    return figures if same_process else figures[""]


def settings(host_delay_us: int, gpu_spin_us: int, extra: list[str], probes: bool = True) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {"base": {}}
    if probes:
        out[f"host delay {host_delay_us} us"] = {"MLXRUNNER_PROBE_HOST_DELAY_US": str(host_delay_us)}
        out["GPU spin control (0)"] = {"MLXRUNNER_PROBE_GPU_SPIN_NS": "0"}
        out[f"GPU spin {gpu_spin_us} us"] = {"MLXRUNNER_PROBE_GPU_SPIN_NS": str(gpu_spin_us * 1000)}
    for setting in extra:  # NAME=VALUE, or several joined by commas (switches timed together)
        out[setting] = dict(assignment.partition("=")[::2] for assignment in setting.split(","))
    return out


def run_setting(folder: Path, rounds: int, env: dict[str, str], same_process: dict | None = None) -> dict:
    extra = ["--same-process-settings", json.dumps(same_process)] if same_process else []
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu.follow_up_slack", "--child", str(folder),
                           "--rounds", str(rounds), *extra], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def paired_rounds(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each setting's second request against base's of the same round in the same process (the two ran next to each
    other, so the machine's drift between rounds and between processes cancels), pooled over the processes: the
    median difference (ms), its quartiles, and in how many rounds the setting was the faster. A process that failed
    (its row holds "error") is left out."""
    out = {}
    for name, rows in runs.items():
        if name == "base":
            continue
        differences = [mine - base for row, base_row in zip(rows, runs["base"], strict=True)
                       if "second_rounds_ms" in row and "second_rounds_ms" in base_row
                       for mine, base in zip(row["second_rounds_ms"], base_row["second_rounds_ms"], strict=True)]
        if not differences:
            continue
        quartiles = statistics.quantiles(differences, n=4) if len(differences) > 1 else [differences[0]] * 3
        out[name] = {"median": statistics.median(differences), "quartiles": [quartiles[0], quartiles[2]],
                     "faster": sum(d < 0 for d in differences), "rounds": len(differences),
                     "processes": sum("second_rounds_ms" in row for row in rows)}
    return out


def layers_of(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "mlxrunner-bench")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", default="qwen3-4b")
    parser.add_argument("--folder", type=Path, help="an existing model folder instead of a built shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--host-delay-us", type=int, default=40)
    parser.add_argument("--gpu-spin-us", type=int, default=20)
    parser.add_argument("--env", action="append", default=[],
                        help="NAME=VALUE[,NAME=VALUE...]: a setting of its own against base")
    parser.add_argument("--no-probes", action="store_true", help="base and the --env settings only")
    parser.add_argument("--same-process", action="store_true",
                        help="every setting in each process, in turn each round (--repeats processes)")
    parser.add_argument("--same-process-settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        same = json.loads(args.same_process_settings) if args.same_process_settings else None
        print(json.dumps(child(args.child, args.rounds, same)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    folder = args.folder
    report: dict = {"settings": {"rounds": args.rounds, "repeats": args.repeats, "host_delay_us": args.host_delay_us,
                                 "gpu_spin_us": args.gpu_spin_us}}
    if folder is None:
        from benchmarks.gpu.llm_bench import build

        folder = args.models_dir / args.only
        report["build"] = build(args.only, folder)
    runs: dict[str, list[dict]] = {}
    chosen = settings(args.host_delay_us, args.gpu_spin_us, args.env, probes=not args.no_probes)
    for _ in range(args.repeats):
        if args.same_process:
            rows = run_setting(folder, args.rounds, {}, same_process=chosen)
            for name in chosen:  # a failed process's error stands in every setting's row
                runs.setdefault(name, []).append(rows.get(name, rows))
            print("process", json.dumps(rows), flush=True)
            continue
        for name, env in chosen.items():
            row = run_setting(folder, args.rounds, env)
            runs.setdefault(name, []).append(row)
            print(name, json.dumps(row), flush=True)
    second = {name: statistics.median(r["second_ms"] for r in rows if "second_ms" in r)
              for name, rows in runs.items() if any("second_ms" in r for r in rows)}
    first = {name: statistics.median(r["first_ms"] for r in rows if "first_ms" in r)
             for name, rows in runs.items() if any("first_ms" in r for r in rows)}
    layers = layers_of(folder)
    report.update(model=str(folder), layers=layers, runs=runs, first_ms=first, second_ms=second)
    base, control = second.get("base"), second.get("GPU spin control (0)")
    delayed, spun = second.get(f"host delay {args.host_delay_us} us"), second.get(f"GPU spin {args.gpu_spin_us} us")
    if base and delayed:
        report["host_sensitivity"] = (delayed - base) * 1e3 / (layers * args.host_delay_us)
    if control and spun:
        report["gpu_sensitivity"] = (spun - control) * 1e3 / (layers * args.gpu_spin_us)
    if args.same_process and "base" in runs:
        report["paired_second_ms"] = paired_rounds(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nthe follow-up's second request, {folder.name}, {layers} layers\n")
    print("| setting | first request ms | second request ms | second / first |")
    print("|---|---:|---:|---:|")
    for name, ms in second.items():
        print(f"| {name} | {first[name]:.2f} | {ms:.2f} | {ms / first[name]:.3f} |")
    for name, pair in report.get("paired_second_ms", {}).items():
        low, high = pair["quartiles"]
        print(f"\n{name}: {pair['median']:+.2f} ms against base in the same round (quartiles {low:+.2f} / {high:+.2f};"
              f" faster in {pair['faster']} of {pair['rounds']} rounds, {pair['processes']} processes)")
    for side in ("host", "gpu"):
        if f"{side}_sensitivity" in report:
            print(f"\n{side} sensitivity: {report[f'{side}_sensitivity']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

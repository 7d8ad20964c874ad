"""The eval worker (csrc/text/eval_worker.h, MLXRUNNER_EVAL_THREAD) changes which thread encodes a prefill's layers,
not what they compute: the tiny Qwen3's greedy tokens and log-probabilities, through a multi-chunk prefill, a prompt
cache hit and a fresh short prompt, are the same bits with the worker as without. On a GPU the switch's 1 uses it;
2, used here, also on the CPU. The switch is read once a process, so each side is a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlxrunner.llm.model import PREFILL_CHUNK

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"

CHILD = r"""
import json, sys
from mlxrunner import store
from mlxrunner.llm.answer import TokenLogprob
from mlxrunner.llm.model import PREFILL_CHUNK, LanguageModel
from mlxrunner.request import Options

model = LanguageModel(store.resolve(sys.argv[1]))
first = [(17 * i + 3) % 499 for i in range(PREFILL_CHUNK + 200)]
prompts = [first, first + [(5 * i + 11) % 499 for i in range(40)], [7, 8, 9]]
out = []
for prompt in prompts:
    items = list(model.stream(prompt, Options(temperature=0.0, repeat_penalty=1.0, num_predict=12), top_logprobs=3))
    done = items[-1]
    out.append({"tokens": [x.token.hex() for x in items if isinstance(x, TokenLogprob)],
                "logprobs": [[x.logprob] + [v for _, v in x.top] for x in items if isinstance(x, TokenLogprob)],
                "cached": done.prompt_cache_count})
print(json.dumps(out))
"""


def generate(switch: str | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "MLXRUNNER_EVAL_THREAD"}
    if switch is not None:
        env["MLXRUNNER_EVAL_THREAD"] = switch
    done = subprocess.run([sys.executable, "-c", CHILD, str(QWEN3)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_eval_worker_gives_the_same_tokens_and_logprobs():
    plain, worked = generate(None), generate("2")
    assert [run["cached"] for run in plain] == [0, PREFILL_CHUNK + 200, 0]  # the second prompt: a cache hit
    assert all(len(run["tokens"]) == 12 for run in worked)
    assert worked == plain

"""Command line: the runner process, plus `mlxrunner embed`, `generate` and `chat` for people.

    mlxrunner --model NAME --port N [--host H]         serve (what a parent server launches)
    mlxrunner runner --imagegen-engine --model NAME --port N   Ollama's launch form, same thing
    mlxrunner embed --model NAME TEXT [TEXT ...]       print embeddings / similarities
    mlxrunner generate --model NAME PROMPT [-o out.png --width --height --steps --seed
                       --negative-prompt --guidance --image PATH ...]   make an image (image models)
    mlxrunner generate --model NAME PROMPT [--raw --system TEXT --temperature T -n N ...]
                                                       stream an answer and its speed (LLMs)
    mlxrunner chat --model NAME [--system TEXT ...]    talk with an LLM (/clear, /bye, Ctrl-C stops a reply)
    mlxrunner quantize SRC DST --bits 4|8 [--group-size N] [--mode M] [--mixed]   float LLM -> mlx-lm folder

One module per command (serve.py, embed.py, generate.py, chat.py, quantize.py); the flags they share, the
prompt argument, settings, loading and the `Error:` line in common.py; what generate and chat do with an LLM
in text.py. Exit codes: 0 success (or SIGINT/SIGTERM while serving), 1 on
a load or serve error (last stderr line `Error: <reason>`), 2 on bad flags (usage on stderr).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # Each command's module is imported only when it runs: `mlxrunner embed` needs no aiohttp, say.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "embed":
        from mlxrunner.cli import embed

        return embed.main(argv[1:])
    if argv and argv[0] == "generate":
        from mlxrunner.cli import generate

        return generate.main(argv[1:])
    if argv and argv[0] == "chat":
        from mlxrunner.cli import chat

        return chat.main(argv[1:])
    if argv and argv[0] == "quantize":
        from mlxrunner.cli import quantize

        return quantize.main(argv[1:])
    from mlxrunner.cli import signals

    shutdown_signals = signals.install()  # before the slow imports: an early SIGTERM is a clean exit too
    from mlxrunner.cli import serve

    return serve.main(argv, shutdown_signals)

"""A scripted LLM served by the runner's real app, for the OpenAI routes' tests of what a random model never writes.

The tiny fixture models are random and never write `<think>` or `<tool_call>`, so these tests serve, through the
runner's real app (RunnerApp, Worker, routes) on a loopback port, a TextModel with Qwen3's real chat template and an
answer written in advance, handed out in small pieces so that tags are split across chunks as a model splits them.
Used by tests/api/test_openai_tools.py and test_openai_responses.py (their `serve` fixtures).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
from aiohttp import web

from mlxrunner.detect import Detected, Mode
from mlxrunner.http.app import RunnerApp
from mlxrunner.http.server import RunnerState
from mlxrunner.llm.answer import Completion
from mlxrunner.models import LoadedModel
from mlxrunner.text.chat_template import ChatTemplate
from mlxrunner.worker import Worker

QWEN3_CHAT = Path(__file__).parent / "fixtures" / "chat" / "qwen3"


class ScriptedLLM:
    """A TextModel that answers every prompt with `answer`, three characters at a time; it records the prompt."""

    dims = 4
    context_length = 4096
    batch = None  # its requests run one at a time

    def __init__(self, answer: str, error: Exception | None = None):
        self.answer = answer
        self.error = error  # raised after the answer's text, as a model that fails midway
        self.chat_template = ChatTemplate.from_folder(QWEN3_CHAT)
        self.prompts: list[str] = []  # the text of each prompt run (as tokenized just before)
        self._tokenized = ""

    def tokenize(self, text: str) -> list[int]:
        self._tokenized = text
        return list(range(len(text.split())))

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenize(text)

    def detokenize(self, ids: list[int]) -> str:
        return ""

    def embed(self, texts, normalize=None, truncate=True, check_cancelled=None):
        raise NotImplementedError

    def stream(self, prompt, options=None, check_cancelled=None, stop_token_ids=(),
               top_logprobs=None, json_output=False, json_schema=None) -> Iterator[str | Completion]:
        self.prompts.append(self._tokenized)
        pieces = [self.answer[i:i + 3] for i in range(0, len(self.answer), 3)]
        yield from pieces
        if self.error is not None:
            raise self.error
        yield Completion(done_reason="stop", stop_reason="eos:0", prompt_eval_count=len(prompt),
                         eval_count=len(pieces))

    def generate(self, prompt, **options):
        raise NotImplementedError


class AppThread:
    """The runner's app on 127.0.0.1 in a thread of its own, serving `model`."""

    def __init__(self, model):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(model), self.loop).result(30)

    async def _start(self, model) -> int:
        loaded = LoadedModel("scripted", Detected(Mode.LLM, "Qwen3ForCausalLM"), model, 0.0)
        self.worker = Worker()
        self.state = RunnerState("scripted", status="ok", loaded=loaded)
        self.app_runner = web.AppRunner(RunnerApp(self.state, self.worker).app())
        await self.app_runner.setup()
        site = web.TCPSite(self.app_runner, "127.0.0.1", 0)
        await site.start()
        return self.app_runner.addresses[0][1]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.app_runner.cleanup(), self.loop).result(30)
        self.worker.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


class ScriptedApps:
    """start(answer, error=None) -> (client, model), each on an app of its own; `apps` holds them (their `state`)."""

    def __init__(self):
        self.apps: list[AppThread] = []

    def start(self, answer: str, error: Exception | None = None) -> tuple[openai.OpenAI, ScriptedLLM]:
        model = ScriptedLLM(answer, error)
        self.apps.append(AppThread(model))
        return self.apps[-1].client(), model

    def close(self) -> None:
        for app in self.apps:
            app.close()

"""Whose fault an error is decides its HTTP status: the real server on a loopback port, with models that fail.

Only a RequestError or a model's typed input error (a prompt too long, an input too long, a bad
image) is a 4xx. Anything else a model raises during a job -- a ValueError from a C++ shape check,
say -- is the runner's fault: a 500 and a log line naming the route and the exception.
"""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mlxrunner.detect import Detected, Mode
from mlxrunner.embed.bert import EmbeddingResult, InputTooLong
from mlxrunner.errors import Cancelled, RequestError
from mlxrunner.http.app import RunnerApp
from mlxrunner.http.server import RunnerState
from mlxrunner.imagegen.images import BadImage
from mlxrunner.llm.answer import Completion
from mlxrunner.llm.model import PromptTooLong
from mlxrunner.models import LoadedModel
from mlxrunner.worker import Worker

SHAPE_ERROR = ValueError("[broadcast_shapes] Shapes (1,16,64) and (1,17,64) cannot be broadcast.")


class FakeLLM:
    """A TextModel whose every method raises `error` (after `chunks` text chunks, for stream)."""

    dims = 4
    context_length = 16
    chat_template = None
    batch = None  # its requests run one at a time

    def __init__(self, error: Exception | None, chunks: int = 0):
        self.error = error
        self.chunks = chunks

    def tokenize(self, text: str) -> list[int]:
        raise self.error

    def encode_prompt(self, text: str) -> list[int]:
        raise self.error

    def detokenize(self, ids: list[int]) -> str:
        raise self.error

    def embed(self, texts, normalize=None, truncate=True, check_cancelled=None) -> EmbeddingResult:
        if self.error is not None:
            raise self.error
        return EmbeddingResult(np.ones((len(texts), self.dims), np.float32), len(texts), [])

    def stream(self, prompt, options=None, check_cancelled=None, json_output=False, json_schema=None):
        for i in range(self.chunks):
            yield f"chunk{i} "
        if self.error is not None:
            raise self.error
        yield Completion(done_reason="stop", stop_reason="eos:0", eval_count=self.chunks)

    def generate(self, prompt, **options):
        raise self.error


class FakeImageModel:
    architecture = "FakePipeline"

    def __init__(self, error: Exception):
        self.error = error

    def run(self, prompt, **kwargs):
        raise self.error

    def warm_up(self):
        return 0, 0.0


def serve(model, mode: Mode, requests):
    """Start the real app on 127.0.0.1 with `model` loaded, and run `requests(client)` against it."""

    async def main():
        state = RunnerState("fake", status="ok", loaded=LoadedModel("fake", Detected(mode, "Fake"), model, 0.0))
        worker = Worker()
        try:
            async with TestServer(RunnerApp(state, worker).app(), host="127.0.0.1") as server:
                async with TestClient(server) as client:
                    return await requests(client)
        finally:
            worker.stop()

    return asyncio.run(main())


def post(model, mode: Mode, path: str, body: dict) -> tuple[int, str, dict | list[dict]]:
    """(status, content type, the JSON body -- or the list of NDJSON lines of a stream)."""

    async def requests(client):
        response = await client.post(path, json=body, headers={"Accept": "application/json"})
        text = await response.text()
        if response.content_type == "application/x-ndjson":
            return response.status, response.content_type, [json.loads(line) for line in text.splitlines()]
        return response.status, response.content_type, json.loads(text)

    return serve(model, mode, requests)


def logged(caplog, *parts: str) -> bool:
    return any(record.levelno == logging.ERROR and all(p in record.getMessage() for p in parts)
               for record in caplog.records)


@pytest.mark.parametrize("path, body", [
    ("/embedding", {"input": ["a", "b"]}),
    ("/tokenize", {"content": "a"}),
    ("/completion", {"prompt": "a"}),
])
@pytest.mark.parametrize("error", [SHAPE_ERROR, RuntimeError("the decoder lost its cache")])
def test_an_internal_error_in_a_job_is_a_500_with_a_log_line(caplog, path, body, error):
    status, _, got = post(FakeLLM(error), Mode.LLM, path, body)
    assert status == 500
    assert got["error"] == f"internal error: {type(error).__name__}: {error}"
    assert logged(caplog, f"POST {path}", type(error).__name__, str(error))


def test_an_internal_error_in_an_image_job_is_a_500_not_a_400(caplog):
    status, _, got = post(FakeImageModel(SHAPE_ERROR), Mode.IMAGEGEN, "/completion", {"prompt": "a fox"})
    assert status == 500 and "cannot be broadcast" in got["error"]
    assert logged(caplog, "POST /completion", "ValueError")


def test_an_internal_error_after_streaming_began_is_a_final_error_line_and_a_log_line(caplog):
    status, content_type, lines = post(FakeLLM(SHAPE_ERROR, chunks=2), Mode.LLM, "/completion", {"prompt": "a"})
    assert status == 200 and content_type == "application/x-ndjson"
    assert [line["content"] for line in lines[:2]] == ["chunk0 ", "chunk1 "]
    message = f"internal error: ValueError: {SHAPE_ERROR}"
    assert lines[-1] == {"error": message, "content": f"error: {message}", "done": True}
    assert logged(caplog, "POST /completion", "ValueError")


def test_a_stream_that_succeeds_ends_with_its_final_line():
    _, _, lines = post(FakeLLM(None, chunks=1), Mode.LLM, "/completion", {"prompt": "a"})
    assert lines[-1]["done"] is True and lines[-1]["stop_reason"] == "eos:0" and lines[-1]["eval_count"] == 1


def test_an_internal_error_on_an_openai_route_is_a_500_in_openais_shape(caplog):
    status, _, got = post(FakeLLM(SHAPE_ERROR), Mode.LLM, "/v1/embeddings", {"input": "a"})
    assert status == 500
    assert got["error"]["type"] == "server_error" and "cannot be broadcast" in got["error"]["message"]
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert logged(caplog, "POST /v1/embeddings", "ValueError")


@pytest.mark.parametrize("model, mode, path, body, message", [
    (FakeLLM(PromptTooLong("the prompt has 20 tokens; the model's context is 16")), Mode.LLM, "/completion",
     {"prompt": "a"}, 'field "prompt": the prompt has 20 tokens'),
    (FakeLLM(InputTooLong("input 1 has 20 tokens, more than the model's maximum of 16")), Mode.LLM, "/embedding",
     {"input": ["a", "b"], "truncate": False}, "input 1 has 20 tokens"),
    (FakeImageModel(BadImage('"images[0]" is 32x32; each side must be at least 64 px')), Mode.IMAGEGEN,
     "/completion", {"prompt": "a"}, '"images[0]" is 32x32'),
    (FakeImageModel(RequestError('"width" x "height" = 4992x1024 is more than the limit')), Mode.IMAGEGEN,
     "/completion", {"prompt": "a"}, '"width" x "height"'),
])
def test_the_models_typed_input_errors_are_400s_and_not_logged_as_internal(caplog, model, mode, path, body,
                                                                            message):
    status, _, got = post(model, mode, path, body)
    assert status == 400 and message in got["error"]
    assert not logged(caplog, "internal error")


def test_an_input_error_on_an_openai_route_names_the_param():
    model = FakeLLM(InputTooLong("input 0 has 20 tokens, more than the model's maximum of 16"))
    status, _, got = post(model, Mode.LLM, "/v1/embeddings", {"input": "a"})
    assert status == 400 and got["error"]["type"] == "invalid_request_error" and got["error"]["param"] == "input"
    status, _, got = post(FakeLLM(None), Mode.LLM, "/v1/embeddings", {"input": "a", "dimensions": 5})
    assert status == 400 and got["error"]["param"] == "dimensions" and '"dimensions"' in got["error"]["message"]


def test_a_model_that_raises_cancelled_is_a_503():
    status, _, got = post(FakeImageModel(Cancelled("cancelled by the progress callback")), Mode.IMAGEGEN,
                          "/completion", {"prompt": "a"})
    assert status == 503 and got["error"] == "request cancelled: cancelled by the progress callback"


def test_detokenize_out_of_the_vocabulary_is_a_400():
    model = FakeLLM(ValueError("token id 99 is outside the vocabulary (size 16)"))
    status, _, got = post(model, Mode.LLM, "/detokenize", {"tokens": [99]})
    assert status == 400 and got["error"] == 'field "tokens": token id 99 is outside the vocabulary (size 16)'


def test_wrong_method_is_405_in_each_protocols_shape():
    async def requests(client):
        runner = await client.get("/embedding", headers={"Accept": "application/json"})
        openai = await client.get("/v1/embeddings")
        return (runner.status, runner.headers.get("Allow"), await runner.json(),
                openai.status, await openai.json())

    status, allow, runner, openai_status, openai = serve(FakeLLM(None), Mode.LLM, requests)
    assert status == 405 and allow == "POST" and runner == {"error": "method GET not allowed on /embedding; use POST"}
    assert openai_status == 405 and openai["error"]["message"] == "method GET not allowed on /v1/embeddings; use POST"

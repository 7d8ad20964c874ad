"""/v1/embeddings from the real `openai` client, against the shared MiniLM runner subprocess.

`embeddings.create()` without `encoding_format` asks for base64 and decodes the little-endian float32 itself,
so the float and base64 answers must give the same vectors; errors come back in OpenAI's shape.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from conftest import cosine


@pytest.fixture(scope="module")
def client(minilm_runner) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{minilm_runner.host}:{minilm_runner.port}/v1", api_key="unused",
                         max_retries=0)


def post_raw(runner, path: str, body: dict | bytes) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{runner.host}:{runner.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_base64_and_float_give_the_same_vectors(client, minilm_goldens):
    sentences = minilm_goldens["sentences"][:2]
    texts = [s["text"] for s in sentences]
    as_base64 = client.embeddings.create(model="all-minilm", input=texts)  # the client asks for base64
    as_floats = client.embeddings.create(model="all-minilm", input=texts, encoding_format="float")
    for a, b, golden in zip(as_base64.data, as_floats.data, sentences):
        assert len(a.embedding) == 384
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
        assert cosine(a.embedding, golden["embedding"]) >= 0.99999
    assert as_base64.usage.prompt_tokens == sum(s["n_tokens"] for s in sentences)
    assert as_base64.model == "all-minilm"


def test_dimensions_cut_and_renormalise(client):
    answer = client.embeddings.create(model="m", input="hello", dimensions=32)
    vector = np.array(answer.data[0].embedding)
    assert vector.shape == (32,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("encoding_format", [False, 0, "", [], {}, "int8"])
def test_an_encoding_format_that_is_not_one_is_a_400_naming_it(minilm_runner, encoding_format):
    status, _, body = post_raw(minilm_runner, "/v1/embeddings", {"input": "x", "encoding_format": encoding_format})
    assert status == 400 and body["error"]["param"] == "encoding_format"


def test_errors_are_openai_shaped(client, minilm_runner):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="m", input=[1, 2])
    assert caught.value.param == "input[0]" and caught.value.body["type"] == "invalid_request_error"
    status, _, body = post_raw(minilm_runner, "/v1/embeddings", b"{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, _, body = post_raw(minilm_runner, "/v1/chat/completions", {"messages": []})
    assert status == 400 and "/v1/embeddings" in body["error"]["message"]


def test_a_body_over_the_limit_is_an_openai_413(minilm_runner):
    status, _, body = post_raw(minilm_runner, "/v1/embeddings", b'{"input": "' + b"a" * (65 * 2**20) + b'"}')
    assert status == 413 and body["error"]["type"] == "invalid_request_error"

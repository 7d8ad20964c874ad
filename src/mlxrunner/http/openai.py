"""OpenAI-style routes: POST /v1/embeddings (chat, completions and images will join it here).

Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, built in error_json.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web

from mlxrunner.http import protocol
from mlxrunner.http.protocol import OpenAIEmbeddingResponse, OpenAIError

if TYPE_CHECKING:
    from mlxrunner.http.server import Handler, HttpError, Server


def routes(server: Server) -> dict[str, Handler]:
    handlers = OpenAIRoutes(server)
    return {"/v1/embeddings": handlers.embeddings}


def error_json(error: HttpError) -> dict:
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return OpenAIError(error.message, kind, param=error.field).to_json()


class OpenAIRoutes:
    def __init__(self, server: Server):
        self.server = server

    async def embeddings(self, request: web.Request) -> web.Response:
        """input, encoding_format (float | base64), dimensions; `model` is echoed back."""
        body = await self.server.read_json(request)
        loaded = self.server.model_for(request)
        model = loaded.embedder
        req = protocol.parse_openai_embedding(body, self.server.limits, model.dims)
        result = await self.server.embed(model, req.embedding)
        vectors = result.vectors
        if req.dimensions is not None:  # Matryoshka-style: cut, then re-normalise as OpenAI does
            vectors = vectors[:, :req.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if req.encoding_format == "base64":
            embeddings = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            embeddings = [v.tolist() for v in vectors]
        response = OpenAIEmbeddingResponse(embeddings, req.model or loaded.name, result.token_count)
        return web.json_response(response.to_json())

"""OpenAI-compatible routes: which there are, the model list and embeddings.

Chat and completions live in openai_chat.py, the Responses API in openai_responses.py, images in
openai_images.py, how they all answer (errors, streams) in openai_replies.py; the wire types in openai_types.py
(and openai_response_types.py). The contract is docs/protocol.md.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web

from mlxrunner.errors import RequestError
from mlxrunner.http.openai_chat import ChatRoutes
from mlxrunner.http.openai_images import ImageRoutes
from mlxrunner.http.openai_replies import loaded_model
from mlxrunner.http.openai_responses import response_routes
from mlxrunner.http.openai_types import ModelCard, OpenAIEmbeddingResponse, parse_openai_embedding

if TYPE_CHECKING:
    from mlxrunner.http.server import Handler, Server


def routes(server: Server) -> dict[str, Handler]:
    """The POST routes."""
    chat, images, own = ChatRoutes(server), ImageRoutes(server), OpenAIRoutes(server)
    return {"/v1/embeddings": own.embeddings, "/v1/chat/completions": chat.chat_completions,
            "/v1/responses": response_routes(server).create, "/v1/completions": chat.completions,
            "/v1/images/generations": images.generations, "/v1/images/edits": images.edits}


def get_routes(server: Server) -> dict[str, Handler]:
    handlers = OpenAIRoutes(server)
    # `.+`: the openai client sends a "/" in an id as %2F, which aiohttp has decoded by the time it routes.
    return {"/v1/models": handlers.list_models, "/v1/models/{model_id:.+}": handlers.retrieve_model,
            "/v1/responses/{response_id}": response_routes(server).retrieve,
            "/v1/responses/{response_id}/input_items": response_routes(server).list_input_items}


def delete_routes(server: Server) -> dict[str, Handler]:
    return {"/v1/responses/{response_id}": response_routes(server).delete}


class OpenAIRoutes:
    def __init__(self, server: Server):
        self.server = server
        # The model's `created`: when this runner started, as a Unix time.
        self.created = int(time.time() - (time.monotonic() - server.state.started))

    def _card(self) -> ModelCard:
        return ModelCard(self.server.state.model_name, self.created)

    async def list_models(self, request: web.Request) -> web.Response:
        """The one model this runner serves, by the name it was started with (loaded or still loading)."""
        return web.json_response({"object": "list", "data": [self._card().to_json()]})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id != self.server.state.model_name:
            raise RequestError(f"model {model_id!r} not found: this runner serves {self.server.state.model_name!r}",
                               status=404, field="model")
        return web.json_response(self._card().to_json())

    async def embeddings(self, request: web.Request) -> web.Response:
        """input, encoding_format (float | base64), dimensions; `model` is echoed back."""
        body = await self.server.read_json(request)
        loaded = loaded_model(self.server, request)
        model = loaded.embedder
        req = parse_openai_embedding(body, self.server.limits, model.dims)
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

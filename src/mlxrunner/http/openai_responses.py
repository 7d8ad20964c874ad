"""POST /v1/responses, GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items: OpenAI's Responses
API for an LLM.

A request becomes a chat (openai_response_types.py) and runs as /v1/chat/completions' does (openai_chat.Chat: the
model's chat template, its stop tokens, the same output parser), so the same request greedy gives the same text on
both routes. The answer is output items: `reasoning` (what the model wrote in `<think>`), a `message` with its
`output_text`, and `function_call`s, in the order the model wrote them. Streamed, each item is opened, written and
closed by the Responses API's events, between `response.created` and `response.completed` (`response.incomplete`
when max_output_tokens cut it, `response.failed` when the runner failed).

Responses are stored unless `store` is false: the last MAX_STORED_RESPONSES, in this process's memory, each with
the conversation it ended. `previous_response_id` continues that conversation (its instructions are not carried
over, as OpenAI does), and the prompt cache makes such a turn's prefill only the new tokens.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable
from weakref import WeakKeyDictionary

from aiohttp import web

from mlxrunner.errors import RequestError
from mlxrunner.http.openai_chat import Chat, forced_call_opening, render_chat
from mlxrunner.http.openai_replies import loaded_model, sse_event, stream_events
from mlxrunner.http.openai_response_types import (
    Conversation,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    function_call_item,
    message_item,
    output_text_part,
    parse_responses,
    reasoning_item,
    token_logprobs,
)
from mlxrunner.http.server import JSON_COMPLETION_JOB
from mlxrunner.llm.answer import TokenLogprob
from mlxrunner.request import str_field
from mlxrunner.text.tool_calls import ContentDelta, ReasoningDelta, ToolCall

if TYPE_CHECKING:
    from mlxrunner.http.server import HttpError, Server
    from mlxrunner.llm.answer import Completion
    from mlxrunner.models import TextModel
    from mlxrunner.worker import JobContext

# Each stored response holds a copy of its whole conversation's text: a bound on what a long-running runner keeps
# for clients that never delete theirs.
MAX_STORED_RESPONSES = 256


def item_id(prefix: str) -> str:
    """OpenAI's form of an id: resp_..., msg_..., rs_..., fc_..."""
    return f"{prefix}_{secrets.token_hex(16)}"


ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


@dataclass(frozen=True)
class Stored:
    response: dict
    conversation: list[dict]  # chat messages: the earlier turns, this input, this output (the instructions not)
    input_items: list[dict]  # this request's input, each item with an id


class StoredResponses:
    """The last MAX_STORED_RESPONSES stored responses, each with the conversation it ended and its input items.
    Written by the worker thread, read by the server's."""

    def __init__(self, most: int = MAX_STORED_RESPONSES):
        self.most = most
        self._kept: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def save(self, response: dict, conversation: list[dict], items: list[dict]) -> None:
        items = [item if "id" in item else {"id": item_id(ITEM_ID_PREFIXES[item["type"]]), **item} for item in items]
        with self._lock:
            self._kept[response["id"]] = Stored(response, conversation, items)
            while len(self._kept) > self.most:
                self._kept.popitem(last=False)

    def _get(self, response_id: str) -> Stored | None:
        with self._lock:
            return self._kept.get(response_id)

    def response(self, response_id: str) -> dict | None:
        kept = self._get(response_id)
        return kept.response if kept else None

    def input_items(self, response_id: str) -> list[dict] | None:
        kept = self._get(response_id)
        return kept.input_items if kept else None

    def conversation(self, response_id: str) -> list[dict]:
        """A copy of the stored conversation (the next request adds to its last turn); a 404 naming
        previous_response_id if it is not kept."""
        kept = self._get(response_id)
        if kept is None:
            raise RequestError(f"previous response {response_id!r} not found: it was not stored (store: false), or "
                               f"is older than the last {self.most} this runner keeps", status=404,
                               field="previous_response_id")
        return copy.deepcopy(kept.conversation)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._kept.pop(response_id, None) is not None


_routes_by_server: WeakKeyDictionary[Server, ResponseRoutes] = WeakKeyDictionary()


def response_routes(server: Server) -> ResponseRoutes:
    """The server's one ResponseRoutes: its POST, GET and DELETE routes share the stored responses."""
    if server not in _routes_by_server:
        _routes_by_server[server] = ResponseRoutes(server)
    return _routes_by_server[server]


class ResponseRoutes:
    def __init__(self, server: Server):
        self.server = server
        self.stored = StoredResponses()

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.read_json(request)
        loaded = loaded_model(self.server, request)
        model = loaded.text_model
        previous = str_field(body, "previous_response_id")
        history = self.stored.conversation(previous) if previous else []
        req = parse_responses(body, self.server.limits, history)
        prompt = render_chat(model, loaded.name, req.chat, field="input")
        if req.chat.forced_tools is not None:
            prompt += forced_call_opening(model, loaded.name)
        run = ResponseRun(model, req, prompt, loaded.name, self.stored)
        job_name = JSON_COMPLETION_JOB if req.chat.json_output else "chat"
        if req.stream:
            return await stream_events(self.server, request, job_name, run.stream_job, frame=event_frame, done=None,
                                       error_events=run.failed_events)
        response = await self.server.run(job_name, run.whole_job)
        return web.json_response(response.to_json())

    async def retrieve(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        response = self.stored.response(response_id)
        if response is None:
            raise RequestError(f"response {response_id!r} not found", status=404, field="response_id")
        return web.json_response(response)

    async def list_input_items(self, request: web.Request) -> web.Response:
        """A stored response's input items, a page at a time: `limit` (1-100, 20), `order` (desc, the newest first,
        or asc), `after` (the last id of the page before)."""
        response_id = request.match_info["response_id"]
        items = self.stored.input_items(response_id)
        if items is None:
            raise RequestError(f"response {response_id!r} not found", status=404, field="response_id")
        limit, order, after = page_query(request.query)
        items = items[::-1] if order == "desc" else items
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise RequestError(f'field "after": {after!r} is not an input item of {response_id!r}', field="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    async def delete(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        if not self.stored.delete(response_id):
            raise RequestError(f"response {response_id!r} not found", status=404, field="response_id")
        return web.json_response({"id": response_id, "object": "response", "deleted": True})


def page_query(query) -> tuple[int, str, str | None]:
    """(limit, order, after) from a list route's query string; a 400 naming the parameter."""
    limit = query.get("limit", "20")
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 100):
        raise RequestError(f'field "limit" must be a whole number from 1 to 100, got {limit!r}', field="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise RequestError(f'field "order" must be "asc" or "desc", got {order!r}', field="order")
    return int(limit), order, query.get("after")


def event_frame(event: dict) -> bytes:
    """A Responses stream event: its type as the SSE event name, then the event as chat's `data:` line."""
    return f"event: {event['type']}\n".encode() + sse_event(event)


class ResponseEvent:
    """One stream event (a Message for the worker's event queue)."""

    def __init__(self, event: dict):
        self.event = event

    def to_json(self) -> dict:
        return self.event


class OutputWriter:
    """The output parser's events (text, reasoning, calls) as the response's output items, appended as each closes;
    `emit(type, **fields)` is told each item's opening, pieces and closing, as the stream's events."""

    def __init__(self, output: list[dict], emit: Callable[..., None], logprobs: bool):
        self.output = output
        self.emit = emit
        self.logprobs = logprobs
        self.open: tuple[str, str] | None = None  # the item being written: (message | reasoning, its id)
        self.text = ""
        self.text_logprobs: list[dict] = []
        # Tokens generated whose text the parser has not given out yet: their logprobs go with the next text (the
        # tokens of reasoning and of calls have no place in an output_text's logprobs).
        self.pending: list[TokenLogprob] = []

    def feed(self, events: list, tokens: list[TokenLogprob]) -> None:
        """events: the parser's; tokens: those generated since the last feed."""
        self.pending += tokens
        for event in events:
            if isinstance(event, ToolCall):
                self.call(event)
            elif isinstance(event, ReasoningDelta):
                self.write("reasoning", event.text, [])
            elif isinstance(event, ContentDelta):
                self.write("message", event.text, self.pending)
            self.pending = []

    def _where(self) -> dict:
        return {"item_id": self.open[1], "output_index": len(self.output), "content_index": 0}

    def _open(self, kind: str) -> None:
        self.close()
        self.open = (kind, item_id("msg" if kind == "message" else "rs"))
        self.text, self.text_logprobs = "", []
        item = message_item(self.open[1], "in_progress") if kind == "message" else reasoning_item(self.open[1],
                                                                                                   "in_progress")
        self.emit("response.output_item.added", output_index=len(self.output), item=item)
        self.emit("response.content_part.added", **self._where(), part=self._part())

    def _part(self) -> dict:
        if self.open[0] == "message":
            return output_text_part(self.text, self.text_logprobs)
        return {"type": "reasoning_text", "text": self.text}

    def write(self, kind: str, text: str, tokens: list[TokenLogprob]) -> None:
        if self.open is None or self.open[0] != kind:
            self._open(kind)
        self.text += text
        if kind == "message":
            logprobs = token_logprobs(tokens) if self.logprobs else []
            self.text_logprobs += logprobs
            self.emit("response.output_text.delta", **self._where(), delta=text, logprobs=logprobs)
        else:
            self.emit("response.reasoning_text.delta", **self._where(), delta=text)

    def close(self, status: str = "completed") -> None:
        if self.open is None:
            return
        kind, own_id = self.open
        if kind == "message":
            self.emit("response.output_text.done", **self._where(), text=self.text, logprobs=self.text_logprobs)
            item = message_item(own_id, status, self.text, self.text_logprobs)
        else:
            self.emit("response.reasoning_text.done", **self._where(), text=self.text)
            item = reasoning_item(own_id, status, self.text)
        self.emit("response.content_part.done", **self._where(), part=self._part())
        self.emit("response.output_item.done", output_index=len(self.output), item=item)
        self.output.append(item)
        self.open = None

    def call(self, call: ToolCall) -> None:
        self.close()
        own_id, index = item_id("fc"), len(self.output)
        self.emit("response.output_item.added", output_index=index,
                  item=function_call_item(own_id, call, "in_progress", arguments=""))
        self.emit("response.function_call_arguments.delta", item_id=own_id, output_index=index, delta=call.arguments)
        self.emit("response.function_call_arguments.done", item_id=own_id, output_index=index,
                  arguments=call.arguments, name=call.name)
        item = function_call_item(own_id, call, "completed")
        self.emit("response.output_item.done", output_index=index, item=item)
        self.output.append(item)

    def finish(self, status: str) -> None:
        """Close the last item (`status`: incomplete where max_output_tokens cut it); an answer with nothing in it
        is one empty message."""
        if self.open is None and not self.output:
            self._open("message")
        self.close(status)


class ResponseRun(Chat):
    """One /v1/responses request's generation, as a worker job: the whole response, or its stream events."""

    def __init__(self, model: TextModel, req: ResponsesRequest, prompt: str, model_name: str, stored: StoredResponses):
        super().__init__(model, req.chat, prompt, model_name)  # self.req: the request as a chat
        self.responses_req = req
        self.response = ResponseObject(item_id("resp"), model_name, req)
        self.stored = stored
        self.sequence = 0  # the next stream event's sequence_number

    def _event(self, kind: str, **fields) -> ResponseEvent:
        event = ResponseEvent({"type": kind, **fields, "sequence_number": self.sequence})
        self.sequence += 1
        return event

    def _lifecycle(self, kind: str) -> ResponseEvent:
        return self._event(kind, response=self.response.to_json())

    def _run(self, ctx: JobContext, emit: Callable[..., None], started: Callable[[], None]) -> None:
        """Generate, writing the output items (and telling `emit`); `started()` once the prompt is taken (a prompt
        refused before that is an HTTP error, not a stream event)."""
        parser, tokens, completion = self._parser(), [], None
        writer = OutputWriter(self.response.output, emit, self.req.logprobs is not None)
        for n, item in enumerate(self._generate(ctx)):
            if n == 0:
                started()
            if isinstance(item, str):
                writer.feed(parser.feed(item), tokens)
                tokens = []
            elif isinstance(item, TokenLogprob):
                tokens.append(item)
            else:
                completion = item
        writer.feed(parser.finish(), tokens)
        self._finish(writer, completion)

    def _finish(self, writer: OutputWriter, completion: Completion) -> None:
        cut = completion.done_reason == "length"
        writer.finish("incomplete" if cut else "completed")
        response = self.response
        response.status = "incomplete" if cut else "completed"
        response.incomplete_reason = "max_output_tokens" if cut else None
        response.usage = ResponseUsage(completion.prompt_eval_count, completion.eval_count,
                                       completion.prompt_cache_count, self._reasoning_tokens(completion))
        if self.responses_req.store:
            conversation = Conversation(self.responses_req.conversation)
            conversation.add_output(response.output)
            self.stored.save(response.to_json(), conversation.messages, self.responses_req.input_items)

    def _reasoning_tokens(self, completion: Completion) -> int:
        """How many of the answer's tokens its reasoning took: the reasoning's text tokenized again."""
        text = "".join(item["content"][0]["text"] for item in self.response.output
                       if item["type"] == "reasoning" and item["content"])
        return min(len(self.model.tokenize(text)), completion.eval_count) if text else 0

    def whole_job(self, ctx: JobContext) -> ResponseObject:
        self._run(ctx, lambda kind, **fields: None, lambda: None)
        return self.response

    def stream_job(self, ctx: JobContext) -> list[ResponseEvent]:
        def started() -> None:
            ctx.emit(self._lifecycle("response.created"))
            ctx.emit(self._lifecycle("response.in_progress"))

        self._run(ctx, lambda kind, **fields: ctx.emit(self._event(kind, **fields)), started)
        return [self._lifecycle(f"response.{self.response.status}")]

    def failed_events(self, error: HttpError) -> list[dict]:
        """A stream's end when the job failed after it began: `response.failed`, its error said."""
        self.response.status = "failed"
        code = "server_error" if error.status >= 500 else "invalid_prompt"
        self.response.error = {"code": code, "message": error.message}
        return [self._lifecycle("response.failed").to_json()]

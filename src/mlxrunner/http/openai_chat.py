"""POST /v1/chat/completions and POST /v1/completions: text generation on OpenAI's wire.

A chat is rendered with the model's own chat template (text/chat_template.py) and run as token ids, so the
template alone decides the special tokens (no BOS is added on top). The answer ends at the template's end-of-
turn tokens as well as the tokenizer's EOS. What the model writes is split (text/tool_calls.py) into content,
`<think>` reasoning (`reasoning_content`) and Hermes `<tool_call>` blocks (`tool_calls`, only when the request
offered tools), streamed or whole alike. /v1/completions runs the prompt as /completion does (with the
tokenizer's BOS) and returns the text as generated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from aiohttp import web

from mlxrunner.errors import RequestError
from mlxrunner.http.openai_replies import loaded_model, stream_events
from mlxrunner.http.openai_types import (
    ChatChunk,
    ChatCompletion,
    ChatRequest,
    TextCompletion,
    TextCompletionRequest,
    Usage,
    UsageChunk,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    parse_chat,
    parse_text_completion,
)
from mlxrunner.http.server import JSON_COMPLETION_JOB
from mlxrunner.llm.answer import TokenLogprob
from mlxrunner.text.chat_template import InvalidMessages, NoChatTemplate, TemplateError
from mlxrunner.text.tool_calls import (
    ContentDelta,
    OutputParser,
    PlainOutput,
    ReasoningDelta,
    ToolCall,
    forced_call_parser,
    prompt_ends_in_reasoning,
)
from mlxrunner.worker import JobContext

if TYPE_CHECKING:
    from mlxrunner.http.protocol import Message
    from mlxrunner.http.server import Server
    from mlxrunner.llm.answer import Completion
    from mlxrunner.models import TextModel


def finish_reason(completion: Completion, called_tools: bool = False) -> str:
    if called_tools:
        return "tool_calls"
    return "length" if completion.done_reason == "length" else "stop"


def usage_of(completion: Completion) -> Usage:
    return Usage(completion.prompt_eval_count, completion.eval_count, completion.prompt_cache_count)


class ChatRoutes:
    def __init__(self, server: Server):
        self.server = server

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.read_json(request)
        loaded = loaded_model(self.server, request)
        model = loaded.text_model
        req = parse_chat(body, self.server.limits)
        prompt = render_chat(model, loaded.name, req)
        if req.forced_tools is not None:
            prompt += forced_call_opening(model, loaded.name)
        chat = Chat(model, req, prompt, model_name=loaded.name)
        job_name = JSON_COMPLETION_JOB if req.json_output else "chat"
        if req.stream.stream:
            return await stream_events(self.server, request, job_name, chat.stream_job)
        answer = await self.server.run(job_name, chat.whole_job)
        return web.json_response(answer.to_json())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.read_json(request)
        loaded = loaded_model(self.server, request)
        req = parse_text_completion(body, self.server.limits)
        completion = PlainCompletion(loaded.text_model, req, model_name=loaded.name)
        if req.stream.stream:
            return await stream_events(self.server, request, "completion", completion.stream_job)
        answer = await self.server.run("completion", completion.whole_job)
        return web.json_response(answer.to_json())


def forced_call_opening(model: TextModel, model_name: str) -> str:
    """What the prompt ends with when the answer must be a tool call: the opening of a Hermes block, as the model
    would write it (the answer is then the call's JSON, held to the tools' schema)."""
    if not model.chat_template.writes_tool_call_blocks:
        raise RequestError(f'field "tool_choice": {model_name}\'s chat template does not write <tool_call> blocks, '
                           "the form a forced call is written in; use \"auto\"", field="tool_choice")
    return "<tool_call>\n"


def render_chat(model: TextModel, model_name: str, req: ChatRequest, field: str = "messages") -> str:
    """The prompt the model's chat template makes of the request; a 400 naming `field` (what the request calls its
    messages: the Responses API's `input`) when it cannot."""
    if model.chat_template is None:
        raise RequestError(f"{model_name} has no chat template (it is a base model, or its chat_template is "
                           "missing), so chat messages cannot be made into a prompt: use /v1/completions with a "
                           "prompt", field=field)
    try:
        return model.chat_template.render(req.messages, tools=req.tools, **req.template_kwargs)
    except InvalidMessages as exc:
        raise RequestError(f'field "{field}": {exc}', field=field) from None
    except TemplateError as exc:
        raise RequestError(f"the model's chat template refused these messages: {exc}", field=field) from None
    except NoChatTemplate as exc:
        raise RequestError(str(exc), field=field) from None


class Chat:
    """One chat request's generation, as a worker job: whole, or as stream chunks."""

    def __init__(self, model: TextModel, req: ChatRequest, prompt: str, model_name: str):
        self.model = model
        self.req = req
        self.prompt = prompt
        self.id = new_id("chatcmpl")
        self.created = now()
        self.model_name = model_name

    def _generate(self, ctx: JobContext) -> Iterator[str | TokenLogprob | Completion]:
        ids = self.model.tokenize(self.prompt)  # the template wrote every special token the model expects
        stop_ids = self.model.chat_template.eos_token_ids
        return self.model.stream(ids, self.req.options, ctx.check_cancelled, stop_token_ids=stop_ids,
                                 top_logprobs=self.req.logprobs, json_output=self.req.json_output,
                                 json_schema=self.req.json_schema)

    def _parser(self) -> OutputParser | PlainOutput:
        if self.req.forced_tools is not None:  # the prompt ends with <tool_call>: the answer is the call's JSON
            return forced_call_parser()
        if self.req.json_output:  # the answer is the JSON: a tag in its strings is text
            return PlainOutput()
        return OutputParser(tool_calls=self.req.tools is not None,
                            starts_in_reasoning=prompt_ends_in_reasoning(self.prompt))

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        return chat_logprobs(tokens) if self.req.logprobs is not None else None

    def whole_job(self, ctx: JobContext) -> ChatCompletion:
        parser, events, tokens, completion = self._parser(), [], [], None
        for item in self._generate(ctx):
            if isinstance(item, str):
                events += parser.feed(item)
            elif isinstance(item, TokenLogprob):
                tokens.append(item)
            else:
                completion = item
        events += parser.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        calls = [e for e in events if isinstance(e, ToolCall)]
        message: dict = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return ChatCompletion(self.id, self.model_name, message, finish_reason(completion, bool(calls)),
                              usage_of(completion), self._logprobs(tokens), created=self.created)

    def stream_job(self, ctx: JobContext) -> list[Message]:
        parser, completion, calls = self._parser(), None, 0
        tokens: list[TokenLogprob] = []  # generated since the last chunk: they go with the next one
        ctx.emit(self._chunk({"role": "assistant", "content": ""}, []))

        def send(events: list) -> None:
            nonlocal calls
            for event in events:
                if isinstance(event, ToolCall):
                    delta = {"tool_calls": [{"index": calls, **event.to_openai()}]}
                    calls += 1
                elif isinstance(event, ReasoningDelta):
                    delta = {"reasoning_content": event.text}
                else:
                    delta = {"content": event.text}
                ctx.emit(self._chunk(delta, tokens))
                tokens.clear()

        for item in self._generate(ctx):
            if isinstance(item, str):
                send(parser.feed(item))
            elif isinstance(item, TokenLogprob):
                tokens.append(item)
            else:
                completion = item
        send(parser.finish())
        last: list[Message] = [self._chunk({}, tokens, finish_reason(completion, calls > 0))]
        if self.req.stream.include_usage:
            last.append(UsageChunk(self.id, "chat.completion.chunk", self.model_name, self.created,
                                   usage_of(completion)))
        return last

    def _chunk(self, delta: dict, tokens: list[TokenLogprob], finish: str | None = None) -> ChatChunk:
        return ChatChunk(self.id, self.model_name, self.created, delta, finish, self._logprobs(tokens))


class PlainCompletion:
    """One /v1/completions request's generation, as a worker job: whole, or as stream pieces."""

    def __init__(self, model: TextModel, req: TextCompletionRequest, model_name: str):
        self.model = model
        self.req = req
        self.id = new_id("cmpl")
        self.created = now()
        self.model_name = model_name

    def _generate(self, ctx: JobContext, on_text: Callable[[str, list[TokenLogprob]], None]) -> Completion:
        """Run the prompt; on_text(text, the tokens generated since the last text) for each piece."""
        completion, tokens = None, []
        for item in self.model.stream(self.req.prompt, self.req.options, ctx.check_cancelled,
                                      top_logprobs=self.req.logprobs):
            if isinstance(item, str):
                on_text(item, tokens)
                tokens = []
            elif isinstance(item, TokenLogprob):
                tokens.append(item)
            else:
                completion = item
        if tokens:
            on_text("", tokens)
        return completion

    def _logprobs(self, tokens: list[TokenLogprob], offset: int) -> dict | None:
        return completion_logprobs(tokens, offset) if self.req.logprobs is not None else None

    def whole_job(self, ctx: JobContext) -> TextCompletion:
        pieces: list[str] = []
        tokens: list[TokenLogprob] = []

        def collect(text: str, new_tokens: list[TokenLogprob]) -> None:
            pieces.append(text)
            tokens.extend(new_tokens)

        completion = self._generate(ctx, collect)
        return TextCompletion(self.id, self.model_name, self.created, "".join(pieces), finish_reason(completion),
                              usage_of(completion), self._logprobs(tokens, 0))

    def stream_job(self, ctx: JobContext) -> list[Message]:
        offset = 0

        def send(text: str, tokens: list[TokenLogprob]) -> None:
            nonlocal offset
            ctx.emit(TextCompletion(self.id, self.model_name, self.created, text, None,
                                    logprobs=self._logprobs(tokens, offset)))
            offset += len(text)

        completion = self._generate(ctx, send)
        last: list[Message] = [TextCompletion(self.id, self.model_name, self.created, "", finish_reason(completion))]
        if self.req.stream.include_usage:
            last.append(UsageChunk(self.id, "text_completion", self.model_name, self.created, usage_of(completion)))
        return last

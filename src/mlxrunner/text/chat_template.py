"""A model's chat template: found and rendered as transformers' `apply_chat_template(..., tokenize=False)` does.

Where the template comes from (transformers 5's rules for a model folder):

* `chat_template.jinja` beside tokenizer_config.json, when there is one;
* else tokenizer_config.json's `chat_template`: a string, or a list of `{"name", "template"}`. Of named
  templates, "tool_use" is used when tools are passed and the model has one, else "default".

transformers also reads extra named templates from a `chat_templates/` folder; mlxrunner does not (a model
source cannot list folders), so such a model renders its `chat_template.jinja` for every request.

How it is rendered: Jinja2's ImmutableSandboxedEnvironment (a template is code that came with the model),
with trim_blocks, lstrip_blocks, the loopcontrols extension, transformers' own `tojson` filter (no HTML
escaping; indent, separators and sort_keys allowed), `raise_exception`, `strftime_now` and its hardened `dict`
and `namespace`. `{% generation %}` blocks, which mark assistant text for training, render their body.
The template sees `messages`, `tools`, `documents` (always None), `add_generation_prompt`, the special tokens
of tokenizer_config.json (`bos_token`, `eos_token`...) and any extra keyword such as `enable_thinking`; extra
keywords override special tokens of the same name.

Messages arrive in OpenAI's chat form and are normalised first (see `normalise_messages`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlxrunner.errors import ModelError

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the tokens a template can read by name.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The names a message's reasoning may come under; transformers fills in the first and "thinking" from any.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class NoChatTemplate(ModelError):
    """The model has no chat template, so chat messages cannot be turned into a prompt."""


class TemplateError(Exception):
    """The template failed on these messages; for the template's own `raise_exception(...)` the message is
    exactly the template's."""


class InvalidMessages(ValueError):
    """The messages are not a chat that can be rendered (empty, not objects, non-text content parts)."""


@runtime_checkable
class ModelFiles(Protocol):
    """A model's files, as mlxrunner.store's model sources offer them."""

    location: str

    def has_file(self, relpath: str) -> bool: ...

    def file_path(self, relpath: str) -> Path: ...


class _Folder:
    """A plain folder as ModelFiles."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.location = str(self.root)

    def has_file(self, relpath: str) -> bool:
        return (self.root / relpath).is_file()

    def file_path(self, relpath: str) -> Path:
        return self.root / relpath


# --- the chat template ------------------------------------------------------------------------------

class ChatTemplate:
    """One model's chat template(s), its special tokens and the token ids that end its turns."""

    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str],
                 eos_token_ids: frozenset[int] = frozenset(), location: str = "chat template"):
        """templates: name -> Jinja source; a model with a single template has only "default"."""
        self.location = location
        self.special_tokens = special_tokens
        self.eos_token_ids = eos_token_ids
        self._templates = {name: _compile(source, name, location) for name, source in templates.items()}
        self._sources = dict(templates)

    @property
    def writes_tool_call_blocks(self) -> bool:
        """Whether the template shows the model Hermes `<tool_call>` blocks (Qwen, Hermes...): the form a forced
        tool call (tool_choice "required") is written in."""
        return any("<tool_call>" in source for source in self._sources.values())

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | ModelFiles) -> ChatTemplate:
        """Load from a model folder (a path) or a model source (mlxrunner.store.ModelSource).

        Raises NoChatTemplate when the model has none, ModelError when its files cannot be read or its
        template does not compile.
        """
        files = folder if isinstance(folder, ModelFiles) else _Folder(folder)
        tokenizer_config = _read_json(files, "tokenizer_config.json")
        templates = _find_templates(files, tokenizer_config)
        if not templates:
            raise NoChatTemplate(f"{files.location}: the model has no chat template (no chat_template.jinja and no "
                                 "chat_template in tokenizer_config.json)")
        eos_ids = _eos_token_ids(_read_json(files, "config.json")) | _eos_token_ids(
            _read_json(files, "generation_config.json"))
        return cls(templates, _special_tokens(tokenizer_config), frozenset(eos_ids), files.location)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """The prompt for `messages` (OpenAI chat form), as transformers renders it.

        tools: OpenAI tool definitions (`{"type": "function", "function": {...}}`), passed to the template as
        they are. kwargs: extra template variables (`enable_thinking=False`...).
        Raises InvalidMessages for messages that cannot be rendered, NoChatTemplate when the model only has
        named templates and none fits, TemplateError when the template fails.
        """
        template = self._select(tools)
        variables = {**self.special_tokens, **kwargs, "messages": normalise_messages(messages), "tools": tools,
                     "documents": None, "add_generation_prompt": add_generation_prompt}
        try:
            return template.render(variables)
        except Exception as exc:  # whatever the template's code raised: this input does not fit this template
            raise TemplateError(str(exc) or type(exc).__name__) from exc

    def _select(self, tools: list[dict] | None) -> jinja2.Template:
        # transformers' get_chat_template: "tool_use" whenever tools are passed (even an empty list).
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise NoChatTemplate(f"{self.location}: the model's chat templates ({', '.join(sorted(self._templates))}) "
                             "include no \"default\"")


# --- loading ----------------------------------------------------------------------------------------

def _read_json(files: ModelFiles, name: str) -> dict:
    """A JSON object file of the model; {} when the model has no such file."""
    if not files.has_file(name):
        return {}
    path = files.file_path(name)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"{files.location}: cannot read {name} ({path}): {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{files.location}: {name} ({path}) is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{files.location}: {name} is not a JSON object")
    return data


def _find_templates(files: ModelFiles, tokenizer_config: dict) -> dict[str, str]:
    """name -> template source; {} when the model has none."""
    if files.has_file("chat_template.jinja"):
        path = files.file_path("chat_template.jinja")
        try:
            return {"default": path.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{files.location}: cannot read chat_template.jinja ({path}): {exc}") from exc
    value = tokenizer_config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    if value is not None:
        raise ModelError(f"{files.location}: tokenizer_config.json's chat_template is neither a string nor a list "
                         "of {\"name\", \"template\"} objects")
    return {}


def _special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """The named special tokens as strings; tokenizer_config.json writes each as a string or an AddedToken dict."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = tokenizer_config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            tokens[name] = token
    return tokens


def _eos_token_ids(config: dict) -> set[int]:
    """A config's `eos_token_id` (int, list or null; multimodal configs keep it in text_config) as a set."""
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and section.get("eos_token_id") is not None:
            value = section["eos_token_id"]
            values = value if isinstance(value, list) else [value]
            # bool is an int in Python; `true` is never a token id.
            return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
    return set()


# --- messages ---------------------------------------------------------------------------------------

def normalise_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages in the form Hugging Face chat templates read. The caller's objects are not changed.

    * Keys whose value is null are dropped, as transformers does: OpenAI clients send `"content": null`
      beside tool_calls, and templates handle a missing key but print "None" for a null one.
    * `content` given as a list of parts becomes one string: the text parts joined with "\\n", as vLLM does
      for templates that read content as a string (the Llama and Qwen templates do). mlx-lm's server joins
      with "" instead, which runs the last word of one part into the first of the next. Non-text parts
      raise InvalidMessages: these models read text only.
    * An assistant message's `tool_calls[i].function.arguments` arrives as a JSON string and is passed as the
      object it encodes, as mlx-lm's server and vLLM do: Llama 3.1's template writes `arguments | tojson`
      and would otherwise print a quoted string. Arguments that do not decode to an object stay as sent.
    * Reasoning sent back under any of reasoning_content, thinking or reasoning is also given under the
      other names templates read (transformers' aliasing: reasoning_content and thinking).
    * Tool result messages (`role: "tool"`, `tool_call_id`, `content`) pass as they are.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidMessages("messages must be a non-empty list")
    return [_normalise_message(message, index) for index, message in enumerate(messages)]


def _normalise_message(message: Any, index: int) -> dict:
    if not isinstance(message, Mapping):
        raise InvalidMessages(f"messages[{index}] is not an object")
    out = {key: value for key, value in message.items() if value is not None}
    if isinstance(out.get("content"), list):
        out["content"] = _joined_text(out["content"], index)
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_with_decoded_arguments(call) for call in out["tool_calls"]]
    reasoning = next((out[key] for key in _REASONING_KEYS if key in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _joined_text(parts: list, index: int) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidMessages(f"messages[{index}].content: only text parts are supported, not {kind or part!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _with_decoded_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    arguments = function.get("arguments") if isinstance(function, Mapping) else None
    if not isinstance(arguments, str):
        return call
    try:
        decoded = json.loads(arguments)
    except json.JSONDecodeError:
        return call
    if not isinstance(decoded, dict):
        return call
    return {**call, "function": {**function, "arguments": decoded}}


# --- the Jinja environment --------------------------------------------------------------------------

def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' filter: Jinja's own escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace() refusing underscore names, which could reach Python internals (transformers' fix)."""

    def __init__(*args: Any, **kwargs: Any):  # Jinja's signature trick: `namespace(self=...)` must still work
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant tokens for training; a
    prompt only needs the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


_ENVIRONMENT = _environment()


def _compile(source: str, name: str, location: str) -> jinja2.Template:
    try:
        return _ENVIRONMENT.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(f"{location}: chat template {name!r} does not compile: {exc} (line {exc.lineno})") from exc

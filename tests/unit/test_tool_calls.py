"""mlxrunner.text.tool_calls: reasoning, content and Hermes-style tool calls out of model output, whole or streamed."""

from __future__ import annotations

import itertools
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mlxrunner.text.tool_calls import (
    ContentDelta,
    Event,
    OutputParser,
    ReasoningDelta,
    ToolCall,
    parse_output,
    prompt_ends_in_reasoning,
)

QWEN3_TOOL_TURN = (
    "<think>\nThe user wants the weather in two cities.\n</think>\n\n"
    "Let me check both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
)


def streamed(text: str, cuts: list[int], **flags: bool) -> list[Event]:
    """The events of `text` fed in pieces split at `cuts`."""
    parser = OutputParser(**flags)
    bounds = [0, *sorted(cuts), len(text)]
    events = [event for start, end in itertools.pairwise(bounds) for event in parser.feed(text[start:end])]
    return events + parser.finish()


def merged(events: list[Event]) -> list[Event]:
    """Adjacent deltas of one kind joined: how a client reassembles a stream."""
    out: list[Event] = []
    for event in events:
        if out and type(event) is type(out[-1]) and not isinstance(event, ToolCall):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out


# --- whole responses ----------------------------------------------------------------------------------

def test_qwen3_turn_with_reasoning_content_and_two_tool_calls() -> None:
    parsed = parse_output(QWEN3_TOOL_TURN)
    assert parsed.reasoning_content == "The user wants the weather in two cities."
    assert parsed.content == "Let me check both."
    assert parsed.tool_calls == [ToolCall("get_weather", '{"city": "Zürich", "unit": "celsius"}'),
                                 ToolCall("get_weather", '{"city": "Oslo"}')]


def test_tool_calls_in_openai_form() -> None:
    first, second = parse_output(QWEN3_TOOL_TURN).tool_calls
    call = first.to_openai()
    assert call == {"id": first.id, "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'}}
    assert re.fullmatch(r"call_[0-9a-f]{24}", first.id) and first.id != second.id
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich", "unit": "celsius"}


def test_text_without_tags_is_kept_exactly() -> None:
    text = "  Hello <b>world</b>\n\n 2 < 3 and </think> is just text here.\n"
    assert parse_output(text) == parse_output(text, tool_calls=False)
    assert (parse_output(text).content, parse_output(text).reasoning_content) == (text, "")


def test_output_starting_inside_a_think_block_the_prompt_opened() -> None:
    parsed = parse_output("Okay, 2 + 2.\n</think>\n\nIt is 4.", starts_in_reasoning=True)
    assert (parsed.reasoning_content, parsed.content) == ("Okay, 2 + 2.", "It is 4.")


def test_an_unclosed_think_block_is_all_reasoning() -> None:
    assert parse_output("<think>\nStill thinking when the tokens ran out ").reasoning_content == \
        "Still thinking when the tokens ran out "


def test_empty_think_block_of_enable_thinking_false() -> None:
    parsed = parse_output("<think>\n\n</think>\n\nParis.")
    assert (parsed.reasoning_content, parsed.content) == ("", "Paris.")


def test_tool_call_tags_inside_reasoning_are_reasoning() -> None:
    parsed = parse_output('<think>I could write <tool_call>{"name": "f"}</tool_call>.</think>No need.')
    assert parsed.reasoning_content == 'I could write <tool_call>{"name": "f"}</tool_call>.'
    assert (parsed.content, parsed.tool_calls) == ("No need.", [])


def test_tool_calls_are_not_looked_for_when_no_tools_were_offered() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert parse_output(text, tool_calls=False).content == text


def test_arguments_given_as_a_string_or_left_out() -> None:
    calls = parse_output('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
                         '<tool_call>{"name": "g"}</tool_call>').tool_calls
    assert calls == [ToolCall("f", '{"x": 1}'), ToolCall("g", "{}")]


def test_malformed_blocks_stay_in_the_content() -> None:
    blocks = ['<tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>',
              "<tool_call>[1, 2]</tool_call>",
              '<tool_call>{"arguments": {}}</tool_call>',
              '<tool_call>{"name": 3}</tool_call>',
              '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
              "<tool_call>" + "[" * 100_000 + "</tool_call>"]
    for block in blocks:
        parsed = parse_output("Before.\n" + block + "\nAfter.")
        assert (parsed.content, parsed.tool_calls) == ("Before.\n" + block + "\nAfter.", [])


def test_a_last_tool_call_cut_off_before_its_closing_tag() -> None:
    assert parse_output('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n').tool_calls == [ToolCall("f", '{"a": 1}')]
    cut_mid_json = parse_output('Sure.\n<tool_call>\n{"name": "f", "argu')
    assert (cut_mid_json.content, cut_mid_json.tool_calls) == ('Sure.\n<tool_call>\n{"name": "f", "argu', [])


def test_prompt_ends_in_reasoning() -> None:
    assert prompt_ends_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_ends_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_ends_in_reasoning("<|im_start|>assistant\n")


# --- streams ------------------------------------------------------------------------------------------

def test_a_possible_tag_is_held_back_until_decided() -> None:
    parser = OutputParser()
    assert parser.feed("Checking.\n<tool_c") == [ContentDelta("Checking.")]
    assert parser.feed('all>{"name": "f", "arguments"') == []
    assert parser.feed(": {}}</tool_call>") == [ToolCall("f", "{}")]
    assert parser.feed(" Done <thi") == [ContentDelta("Done")]
    assert parser.feed("s is not a tag") == [ContentDelta(" <this is not a tag")]
    assert parser.finish() == []


def test_reasoning_streams_before_its_closing_tag_arrives() -> None:
    parser = OutputParser(starts_in_reasoning=True)
    assert parser.feed("\nHmm, 2 + 2 \n</th") == [ReasoningDelta("Hmm, 2 + 2")]
    assert parser.feed("ink>\n\n") == []
    assert parser.feed("4") == [ContentDelta("4")]
    assert parser.finish() == []


def test_held_back_text_is_sent_at_the_end() -> None:
    parser = OutputParser()
    assert parser.feed("a < b\n<tool_") == [ContentDelta("a < b")]
    assert parser.finish() == [ContentDelta("\n<tool_")]


FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<thi", "</th", "<tool_c", "</tool_",
             "<", ">", "\n", "\n\n", " ", "Hello", "ü€", '{"name": "f", "arguments": {"x": [1, "<a>"]}}',
             '{"name": "g"}', '{"name": ', "{oops}", '"arguments": {}}']
pieces = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=25)


@settings(max_examples=300)
@given(pieces=pieces, data=st.data(), tool_calls=st.booleans(), starts_in_reasoning=st.booleans())
def test_any_split_of_a_stream_gives_the_whole_parse(pieces: list[str], data: st.DataObject, tool_calls: bool,
                                                     starts_in_reasoning: bool) -> None:
    text = "".join(pieces)
    flags = {"tool_calls": tool_calls, "starts_in_reasoning": starts_in_reasoning}
    between_pieces = [sum(map(len, pieces[:i])) for i in range(len(pieces) + 1)]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    events = merged(streamed(text, cuts, **flags))
    assert events == merged(streamed(text, [], **flags))
    # Fed piece by piece, every tag also arrives apart from the text before and after it.
    assert merged(streamed(text, between_pieces, **flags)) == events
    whole = parse_output(text, **flags)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == whole.content
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == whole.reasoning_content
    assert [e for e in events if isinstance(e, ToolCall)] == whole.tool_calls


@given(text=st.text(alphabet=st.characters(exclude_characters="<")), tool_calls=st.booleans())
def test_text_without_tags_comes_out_unchanged(text: str, tool_calls: bool) -> None:
    assert parse_output(text, tool_calls=tool_calls) == parse_output(text, tool_calls=False)
    assert parse_output(text, tool_calls=tool_calls).content == text

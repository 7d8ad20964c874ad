"""mlxrunner.text: TextTokenizer, StreamingDetokenizer, StopMatcher.

The tokenizers are tiny ones trained here with `tokenizers` (vocabulary ~300, so CJK characters and
emoji are split over several tokens), in the two shapes real models use: GPT-2 byte-level BPE
(Llama 3, Qwen) and SentencePiece-converted BPE with byte fallback (Llama 2, Gemma).
Randomised tests use `random` with fixed seeds, so failures reproduce.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mlxrunner.errors import ModelError
from mlxrunner.store import DirectorySource
from mlxrunner.text.detokenizer import StreamingDetokenizer
from mlxrunner.text.stop import StopMatcher
from mlxrunner.text.tokenizer import DecoderKind, TextTokenizer, describe_decoder

CORPUS = [
    "Hello world, this is a small test of the tokenizer. The quick brown fox jumps over the lazy dog.",
    "def main():\n    print('hi')  # code, with    indentation\n\treturn 0\n",
    "你好，世界！这是一个测试。我们今天去公园散步吧。中文文本需要被拆分成字节。",
    "日本語のテキストもあります。カタカナとひらがな。",
    "한국어 문장도 있습니다.",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and more 🚀🚀🚀",
    "Café naïve résumé façade — “quotes” ‘single’ …",
    "Привет, мир! Как дела? Ελληνικά γράμματα. مرحبا بالعالم. שלום עולם.",
    "Numbers 12345 67890 3.14159 and symbols €£¥ ©®™ ±×÷",
]
SPECIALS = ["<s>", "</s>", "<|im_end|>"]
NON_ASCII_SPECIAL = "<｜end▁of▁sentence｜>"  # DeepSeek style: characters outside the GPT-2 byte table


def random_text(rng: random.Random, length: int) -> str:
    """Random text drawn from the corpus' characters plus a few the tokenizers never saw."""
    alphabet = "".join(CORPUS) + "龘𝄞🦄ǅ\x00\x7f"
    return "".join(rng.choice(alphabet) for _ in range(length))


def save(tokenizer: Tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def write_model(folder: Path, tokenizer_json: Path, **configs: dict) -> DirectorySource:
    """A model folder holding a tokenizer.json and the given configs (tokenizer_config=..., etc.)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    for name, data in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return DirectorySource("test-model", folder)


# --- tokenizers built for the tests --------------------------------------------------------------

def train_byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    tokenizer.add_special_tokens([NON_ASCII_SPECIAL])
    return tokenizer


@functools.cache
def sentencepiece_json() -> str:
    """Llama-2-like: Metaspace pre-tokenizer, `▁` pieces, `<0xNN>` byte-fallback pieces in the
    model vocabulary (not added tokens), and rare characters left out so they fall back to bytes.
    Trained once: BPE training breaks ties arbitrarily, so ids differ between two trainings."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, limit_alphabet=60, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    specials = {"<unk>", "<s>", "</s>"}
    ordinary = [piece for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if piece not in specials]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["<unk>", "<s>", "</s>", *byte_pieces, *ordinary]
    data["model"]["vocab"] = {piece: index for index, piece in enumerate(pieces)}
    data["model"]["byte_fallback"] = True
    data["added_tokens"] = [dict(token, id=pieces.index(token["content"])) for token in data["added_tokens"]]
    data["decoder"] = None
    return json.dumps(data)


def sentencepiece_with(decoder: decoders.Decoder) -> Tokenizer:
    tokenizer = Tokenizer.from_str(sentencepiece_json())
    tokenizer.decoder = decoder
    return tokenizer


LLAMA2_DECODER = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
GEMMA_DECODER = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> TextTokenizer:
    path = save(train_byte_level(), tmp_path_factory.mktemp("byte_level"))
    return TextTokenizer(path, {"eos_token": "</s>"})


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(save(sentencepiece_with(LLAMA2_DECODER), tmp_path_factory.mktemp("llama2")))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(save(sentencepiece_with(GEMMA_DECODER), tmp_path_factory.mktemp("gemma")))


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory) -> TextTokenizer:
    decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return TextTokenizer(save(sentencepiece_with(decoder), tmp_path_factory.mktemp("metaspace")))


def stream(tokenizer: TextTokenizer, ids: list[int]) -> list[str]:
    """The chunks a StreamingDetokenizer yields for ids, the flush last."""
    detokenizer = StreamingDetokenizer(tokenizer)
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


def hf_decode(tokenizer: TextTokenizer, ids: list[int]) -> str:
    """The reference: `tokenizers`' own whole-sequence decode."""
    return tokenizer._tokenizer.decode(ids, skip_special_tokens=False)


# --- TextTokenizer: decoder kinds and token bytes ------------------------------------------------

def test_decoder_kinds(byte_level, llama2, gemma, metaspace):
    assert (byte_level.decoder_kind, byte_level.leading_spaces_stripped) == (DecoderKind.BYTE_LEVEL, 0)
    assert (llama2.decoder_kind, llama2.leading_spaces_stripped) == (DecoderKind.SENTENCEPIECE, 1)
    assert (gemma.decoder_kind, gemma.leading_spaces_stripped) == (DecoderKind.SENTENCEPIECE, 0)
    assert metaspace.decoder_kind is DecoderKind.OTHER


@pytest.mark.parametrize("decoder, expected", [
    (None, (DecoderKind.OTHER, False, 0)),
    ({"type": "ByteLevel"}, (DecoderKind.BYTE_LEVEL, False, 0)),
    ({"type": "Sequence", "decoders": [{"type": "ByteLevel"}]}, (DecoderKind.BYTE_LEVEL, False, 0)),
    ({"type": "WordPiece", "prefix": "##"}, (DecoderKind.OTHER, False, 0)),
    # Strip before Fuse strips every token, which we do not reproduce.
    ({"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                       {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
     (DecoderKind.OTHER, False, 0)),
    ({"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                       {"type": "Fuse"}]},
     (DecoderKind.SENTENCEPIECE, False, 0)),
])
def test_describe_decoder(decoder, expected):
    assert describe_decoder(decoder) == expected


def test_byte_level_token_bytes(byte_level):
    ids = byte_level.encode("世 😀", add_bos=False)
    assert b"".join(byte_level.token_bytes(i) for i in ids) == "世 😀".encode()
    assert len(ids) > 3  # split inside characters, which is the point of these tests
    assert byte_level.token_bytes(byte_level._tokenizer.token_to_id("Ġ")) == b" "
    for special in [*SPECIALS, NON_ASCII_SPECIAL]:
        assert byte_level.token_bytes(byte_level._tokenizer.token_to_id(special)) == special.encode()
    assert byte_level.token_bytes(byte_level.vocab_size + 5) == b""


def test_added_tokens_are_literal_text_unless_they_repeat_a_vocabulary_piece(tmp_path):
    tokenizer = train_byte_level()
    byte_e9 = tokenizer.token_to_id("é")  # GPT-2's character for the byte 0xE9, already a piece
    tokenizer.add_special_tokens(["é"])  # re-declares that piece: still the byte, as tokenizers decodes it
    tokenizer.add_tokens(["hello there"])
    loaded = TextTokenizer(save(tokenizer, tmp_path))
    assert loaded._tokenizer.token_to_id("é") == byte_e9 and loaded.token_bytes(byte_e9) == b"\xe9"
    phrase = loaded._tokenizer.token_to_id("hello there")
    assert loaded.token_bytes(phrase) == b"hello there"
    assert "".join(stream(loaded, [phrase, byte_e9])) == hf_decode(loaded, [phrase, byte_e9]) == "hello there\ufffd"


def test_sentencepiece_token_bytes(llama2):
    vocab = llama2._tokenizer
    assert llama2.token_bytes(vocab.token_to_id("<0xE4>")) == b"\xe4"
    assert llama2.token_bytes(vocab.token_to_id("▁")) == b" "
    assert llama2.token_bytes(vocab.token_to_id("<s>")) == b"<s>"
    ids = llama2.encode("Hello 龘 world", add_bos=False)
    assert b"".join(llama2.token_bytes(i) for i in ids) == b" Hello \xe9\xbe\x98 world"


def test_vocab_size_counts_added_tokens(byte_level):
    assert byte_level.vocab_size == byte_level._tokenizer.token_to_id(NON_ASCII_SPECIAL) + 1


# --- TextTokenizer: BOS ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_json(tmp_path_factory) -> Path:
    return save(train_byte_level(), tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def bos_adding_json(tmp_path_factory) -> Path:
    """Llama 3 style: the post-processor adds BOS."""
    tokenizer = train_byte_level()
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    return save(tokenizer, tmp_path_factory.mktemp("bos_adding"))


BOS_CONFIG = {"bos_token": "<s>", "add_bos_token": True}


def test_bos_from_post_processor_only(bos_adding_json):
    tokenizer = TextTokenizer(bos_adding_json, {"bos_token": "<s>"})
    bos = tokenizer.bos_id
    assert tokenizer.encode("hi")[0] == bos and tokenizer.encode("hi")[1] != bos
    assert bos not in tokenizer.encode("hi", add_bos=False)


def test_bos_from_post_processor_and_config_is_single(bos_adding_json):
    tokenizer = TextTokenizer(bos_adding_json, BOS_CONFIG)
    ids = tokenizer.encode("hi")
    assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id


def test_bos_prepended_from_config(plain_json):
    tokenizer = TextTokenizer(plain_json, BOS_CONFIG)
    assert tokenizer.encode("hi") == [tokenizer.bos_id, *tokenizer.encode("hi", add_bos=False)]
    assert tokenizer.encode("") == [tokenizer.bos_id]


def test_no_bos_unless_asked(plain_json):
    tokenizer = TextTokenizer(plain_json, {"bos_token": "<s>", "add_bos_token": False})
    assert tokenizer.bos_id is not None
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_bos=False)


@pytest.mark.parametrize("fixture", ["plain_json", "bos_adding_json"])
def test_prompt_starting_with_bos_text_gets_one_bos(fixture, request):
    tokenizer = TextTokenizer(request.getfixturevalue(fixture), BOS_CONFIG)
    ids = tokenizer.encode("<s>hi")
    assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id


def test_special_tokens_in_text_become_ids(plain_json):
    tokenizer = TextTokenizer(plain_json)
    end = tokenizer._tokenizer.token_to_id("<|im_end|>")
    assert end in tokenizer.encode("hi<|im_end|>", add_bos=False)


# --- TextTokenizer: EOS and loading --------------------------------------------------------------

def test_eos_generation_config_overrides_config_and_joins_tokenizer_config(plain_json):
    tokenizer = TextTokenizer(plain_json, {"eos_token": {"content": "<|im_end|>", "lstrip": False}},
                              generation_config={"eos_token_id": [1, 7]}, config={"eos_token_id": 99})
    im_end = tokenizer._tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.eos_ids == frozenset({1, 7, im_end})
    assert tokenizer.eos_or_pad_id() == 1


def test_eos_from_config_when_generation_config_has_none(plain_json):
    tokenizer = TextTokenizer(plain_json, {"eos_token": "<not a token>"}, generation_config={"bos_token_id": 0},
                              config={"eos_token_id": 2, "bos_token_id": 5})
    assert tokenizer.eos_ids == frozenset({2})
    assert tokenizer.bos_id == 0  # generation_config first


def test_no_eos_falls_back_to_pad(plain_json):
    tokenizer = TextTokenizer(plain_json, {"pad_token": "</s>"})
    assert tokenizer.eos_ids == frozenset()
    assert tokenizer.eos_or_pad_id() == tokenizer._tokenizer.token_to_id("</s>")


def test_from_source_reads_configs(tmp_path, plain_json):
    source = write_model(tmp_path / "model", plain_json,
                         tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
                         generation_config={"eos_token_id": 2}, config={"eos_token_id": 5})
    tokenizer = TextTokenizer.from_source(source)
    assert tokenizer.bos_id == tokenizer._tokenizer.token_to_id("<s>")
    assert tokenizer.eos_ids == frozenset({2, tokenizer._tokenizer.token_to_id("</s>")})
    assert tokenizer.encode("hi")[0] == tokenizer.bos_id


def test_from_source_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="tokenizer.json"):
        TextTokenizer.from_source(DirectorySource("m", tmp_path))


def test_broken_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        TextTokenizer(tmp_path / "tokenizer.json")


def test_padding_and_truncation_in_tokenizer_json_are_ignored(tmp_path):
    tokenizer = train_byte_level()
    tokenizer.enable_padding(length=64, pad_id=0, pad_token="<s>")
    tokenizer.enable_truncation(max_length=3)
    loaded = TextTokenizer(save(tokenizer, tmp_path))
    text = "a fairly long piece of text"
    assert loaded.decode(loaded.encode(text, add_bos=False)) == text


# --- StreamingDetokenizer ------------------------------------------------------------------------

def test_character_split_over_tokens_is_emitted_whole(byte_level):
    ids = byte_level.encode("龘", add_bos=False)  # not in the corpus: three byte tokens
    assert len(ids) == 3
    assert stream(byte_level, ids) == ["", "", "龘", ""]


def test_never_emits_replacement_for_valid_text(byte_level, llama2):
    rng = random.Random(1)
    for tokenizer in (byte_level, llama2):
        for _ in range(200):
            text = random_text(rng, rng.randrange(1, 40))
            chunks = stream(tokenizer, tokenizer.encode(text, add_bos=False))
            assert not any("\ufffd" in chunk for chunk in chunks)


def test_invalid_bytes_become_replacement_once_certain(byte_level):
    lead = byte_level.encode("世", add_bos=False)[0]  # 0xE4: starts a 3-byte character
    letter = byte_level.encode("a", add_bos=False)[0]
    assert stream(byte_level, [lead, letter]) == ["", "\ufffda", ""]
    assert stream(byte_level, [letter, lead]) == ["a", "", "\ufffd"]  # only at the end it is certain


def test_special_tokens_are_streamed_as_text(byte_level):
    ids = byte_level.encode(f"a<|im_end|>{NON_ASCII_SPECIAL}b", add_bos=False)
    assert "".join(stream(byte_level, ids)) == f"a<|im_end|>{NON_ASCII_SPECIAL}b"


@pytest.mark.parametrize("seed", range(8))
def test_byte_level_stream_equals_decode_for_random_ids(byte_level, seed):
    rng = random.Random(seed)
    for _ in range(250):
        ids = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randrange(0, 30))]
        assert "".join(stream(byte_level, ids)) == hf_decode(byte_level, ids), ids


@pytest.mark.parametrize("seed", range(4))
def test_byte_level_stream_equals_decode_for_random_texts(byte_level, seed):
    rng = random.Random(100 + seed)
    for _ in range(100):
        text = random_text(rng, rng.randrange(0, 60))
        ids = byte_level.encode(text, add_bos=False)
        chunks = stream(byte_level, ids)
        assert "".join(chunks) == hf_decode(byte_level, ids) == text


@pytest.mark.parametrize("name", ["llama2", "gemma", "metaspace"])
@pytest.mark.parametrize("seed", range(4))
def test_sentencepiece_stream_equals_decode(name, seed, request):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(200 + seed)
    for _ in range(100):
        # Concatenated encodings: byte-fallback runs stay valid UTF-8, and "▁" lands at odd places.
        # A <s> between two texts: special tokens must not disturb the leading-space rule.
        texts = [random_text(rng, 20) for _ in range(rng.randrange(0, 4))]
        separator = [tokenizer._tokenizer.token_to_id("<s>")] if rng.random() < 0.3 else []
        ids = [i for text in texts for i in [*separator, *tokenizer.encode(text, add_bos=False)]]
        assert "".join(stream(tokenizer, ids)) == hf_decode(tokenizer, ids), ids


@pytest.mark.parametrize("name", ["llama2", "gemma"])
@pytest.mark.parametrize("seed", range(4))
def test_sentencepiece_stream_equals_decode_for_random_ids(name, seed, request):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(300 + seed)
    checked = 0
    for _ in range(300):
        # Mostly ordinary pieces: a random <0xNN> run is usually invalid UTF-8 (see below).
        first_ordinary = 259  # after <unk> <s> </s> and the 256 byte pieces
        ids = [rng.randrange(0 if rng.random() < 0.3 else first_ordinary, tokenizer.vocab_size)
               for _ in range(rng.randrange(0, 20))]
        expected = hf_decode(tokenizer, ids)
        # ByteFallback turns every byte of an invalid <0xNN> run into U+FFFD, valid ones included;
        # we replace only the invalid bytes. Outside that case the two must agree.
        if "\ufffd" not in expected:
            assert "".join(stream(tokenizer, ids)) == expected, ids
            checked += 1
    assert checked > 150


def test_sentencepiece_leading_space_stripped_once(llama2, gemma):
    ids = llama2.encode("Hello world", add_bos=False)
    assert llama2.token_bytes(ids[0]).startswith(b" ")
    assert "".join(stream(llama2, ids)) == "Hello world"
    assert "".join(stream(gemma, ids)) == " Hello world"
    space = llama2._tokenizer.token_to_id("▁")
    spaced = [space, space, *ids]
    chunks = stream(llama2, spaced)
    assert chunks[:2] == ["", " "] and "".join(chunks) == "  Hello world" == hf_decode(llama2, spaced)


def test_leading_space_strip_waits_for_first_character(llama2):
    # The first character arrives over three byte-fallback tokens, after a "▁".
    vocab = llama2._tokenizer
    ids = [vocab.token_to_id(p) for p in ("▁", "<0xE9>", "<0xBE>", "<0x98>")]
    assert stream(llama2, ids) == ["", "", "", "龘", ""]
    assert "".join(stream(llama2, ids)) == hf_decode(llama2, ids)


def test_bos_first_keeps_the_space(llama2):
    ids = [llama2._tokenizer.token_to_id("<s>"), *llama2.encode("Hi", add_bos=False)]
    assert "".join(stream(llama2, ids)) == "<s> Hi" == hf_decode(llama2, ids)


# --- StopMatcher ---------------------------------------------------------------------------------

def run_stops(stops: list[str], pieces: list[str]) -> tuple[str, str | None, list[str]]:
    """Feed pieces; return (all text sent, the stop matched or None, what each push sent)."""
    matcher = StopMatcher(stops)
    sent, matched = [], None
    for piece in pieces:
        emit, matched = matcher.push(piece)
        sent.append(emit)
        if matched is not None:
            break
    text = "".join(sent) + ("" if matched is not None else matcher.flush())
    return text, matched, sent


def test_no_stops_passes_everything_through():
    matcher = StopMatcher([])
    assert [matcher.push(p) for p in ["a", "<", "stop"]] == [("a", None), ("<", None), ("stop", None)]
    assert matcher.flush() == ""


def test_stop_split_over_three_pieces():
    text, matched, sent = run_stops(["<|end|>"], ["Hello <|", "en", "d|> after"])
    assert (text, matched, sent) == ("Hello ", "<|end|>", ["Hello ", "", ""])


def test_held_text_released_when_match_fails():
    text, matched, sent = run_stops(["<|end|>"], ["a <|", "en", "X b"])
    assert (text, matched, sent) == ("a <|enX b", None, ["a ", "", "<|enX b"])


def test_partial_match_held_until_flush():
    text, matched, sent = run_stops(["STOP"], ["abc ST"])
    assert (text, matched, sent) == ("abc ST", None, ["abc "])


def test_stop_at_very_start():
    assert run_stops(["###"], ["###", "more"]) == ("", "###", [""])
    assert run_stops(["###"], ["#", "##x"]) == ("", "###", ["", ""])


@pytest.mark.parametrize("pieces, expected_text, expected_stop", [
    (["xab"], "x", "ab"),
    (["xabc"], "x", "abc"),  # same position: the longest wins
    (["x", "a", "b"], "x", "ab"),  # streamed, "ab" completes first
    (["xbca"], "x", "bca"),
    (["xbcab"], "x", "bca"),  # earliest occurrence wins over a later one
    (["b", "c", "a"], "", "bca"),
    (["xb", "cx"], "xbcx", None),
])
def test_overlapping_stops(pieces, expected_text, expected_stop):
    text, matched, _ = run_stops(["ab", "abc", "bca"], pieces)
    assert (text, matched) == (expected_text, expected_stop)


def test_stop_inside_partial_match_of_another():
    # "<|im" is held as a possible "<|im_end|>" when "im" completes the other stop.
    assert run_stops(["<|im_end|>", "|im"], ["a<", "|i", "m_"])[:2] == ("a<", "|im")
    assert run_stops(["abcd", "bc"], ["a", "b", "c", "d"])[:2] == ("a", "bc")


def test_unicode_stops():
    assert run_stops(["。\n"], ["你好", "。", "\n再见"])[:2] == ("你好", "。\n")
    assert run_stops(["👍🏽"], ["ok 👍", "🏽 yes"])[:2] == ("ok ", "👍🏽")
    assert run_stops(["👍🏽"], ["ok 👍", " yes"])[:2] == ("ok 👍 yes", None)


def test_nothing_after_a_match():
    matcher = StopMatcher(["x"])
    assert matcher.push("axb") == ("a", "x")
    assert matcher.push("more") == ("", "x")
    assert matcher.flush() == ""


def test_hold_back_is_only_a_possible_stop_start():
    matcher = StopMatcher(["abc"])
    assert matcher.push("zzab") == ("zz", None)
    assert matcher.push("a") == ("ab", None)  # "aba" cannot start "abc"; "a" can
    assert matcher.flush() == "a"


def earliest_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Reference: (position, stop) of the earliest stop in text, the longest at equal positions."""
    found = [(text.find(s), -len(s), s) for s in stops if s in text]
    return min(found)[::2] if found else None


@pytest.mark.parametrize("seed", range(6))
def test_random_splits(seed):
    """Against a reference: generation stops after the first piece that completes a stop string; the
    text sent is everything before the earliest stop in the text received so far."""
    rng = random.Random(400 + seed)
    for _ in range(400):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4)))
                 for _ in range(rng.randrange(0, 4))]
        text = "".join(rng.choice("abcd") for _ in range(rng.randrange(0, 20)))
        cuts = sorted(rng.sample(range(1, len(text) + 1), rng.randrange(0, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], cuts)] + ([text[cuts[-1]:]] if cuts else [text])
        expected: tuple[str, str | None] = (text, None)
        for end in [*cuts, len(text)]:
            match = earliest_stop(text[:end], stops)
            if match:
                expected = (text[:match[0]], match[1])
                break
        assert run_stops(stops, pieces)[:2] == expected, (stops, pieces)

"""The offline Qwen tokenizer the image-pipeline golden scripts share (no model hub here)."""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX


def build_qwen_tokenizer(corpus: list[str], chat_template: str) -> Qwen2TokenizerFast:
    """Byte-level BPE (400 merges' worth of vocabulary) trained on `corpus` with the exact Qwen2
    pre-tokenizer (NFC, regex split + ByteLevel), Qwen3's special tokens appended in Qwen's order,
    right padding with <|endoftext|>."""
    base = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                fuse_unk=False, byte_fallback=False))
    base.normalizer = normalizers.NFC()
    base.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    base.train_from_iterator(corpus, trainer)
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in model["merges"]]
    # Special / added tokens after the BPE vocab (Qwen3: 151643, 151644, 151645, 151667, 151668)
    for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]:
        vocab[t] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                             eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True),
                    AddedToken("<|endoftext|>", special=True)], special_tokens=True)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.chat_template = chat_template
    tok.model_max_length = 131072
    tok.padding_side = "right"
    return tok

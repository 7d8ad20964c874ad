"""Golden chat answers: transformers' `apply_chat_template` + greedy `generate` on the tiny Qwen3 chat model.

The model is the one tests/api/test_openai_chat.py serves: tests/fixtures/llm/qwen3-tiny with the Qwen3 chat
template of tests/fixtures/chat/qwen3/tokenizer_config.json. For each conversation, transformers renders the
prompt (add_generation_prompt=True), generates greedily (do_sample=False, no repetition penalty, the folder's
generation_config.json end-of-turn ids), and the generated ids and their text (end token excluded) go to
tests/goldens/chat_generate.json. The test sends the same conversations through the `openai` client at
temperature 0 and compares the text and the token count exactly.

Usage, from the repository root, in the golden venv (torch CPU + transformers; docs/testing.md):

    .goldens/bin/python scripts/goldens_chat_generate.py
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
QWEN3 = REPO_ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
TEMPLATE = REPO_ROOT / "tests" / "fixtures" / "chat" / "qwen3" / "tokenizer_config.json"
OUTPUT = REPO_ROOT / "tests" / "goldens" / "chat_generate.json"
MAX_NEW_TOKENS = 24

CONVERSATIONS = {
    "system_and_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}],
    "user_only": [{"role": "user", "content": "Count to five, please."}],
    "two_turns": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And another one?"}],
}


def chat_folder(out: Path) -> Path:
    for file in QWEN3.iterdir():
        shutil.copy(file, out / file.name)
    shutil.copy(TEMPLATE, out / "tokenizer_config.json")
    return out


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = chat_folder(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        end_ids = model.generation_config.eos_token_id
        end_ids = set(end_ids if isinstance(end_ids, list) else [end_ids])
        cases = {}
        for name, messages in CONVERSATIONS.items():
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            with torch.no_grad():
                output = model.generate(**prompt, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                        repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)
            new = output[0, prompt["input_ids"].shape[1]:].tolist()
            ended = bool(new) and new[-1] in end_ids
            answer = new[:-1] if ended else new
            cases[name] = {"messages": messages, "prompt_ids": prompt["input_ids"][0].tolist(), "ids": answer,
                           "text": tokenizer.decode(answer, skip_special_tokens=False),
                           "finish_reason": "stop" if ended else "length"}
    OUTPUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                  "max_new_tokens": MAX_NEW_TOKENS, "cases": cases}, indent=1,
                                 ensure_ascii=False) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()

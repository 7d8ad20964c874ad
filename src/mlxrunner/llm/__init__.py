"""LLM mode. Public API: ``model = load(path_or_name)``; ``model.generate(prompt, **options)``
iterates text chunks; ``model.logits(ids)``, ``model.tokenize(text)``, ``model.detokenize(ids)``."""

from __future__ import annotations


def load(name: str, models_dir: str | None = None):
    """Load an LLM (llm/architectures.py lists which) from a folder, an Ollama name, ... (store.resolve)."""
    from mlxrunner import store
    from mlxrunner.detect import Mode, detect
    from mlxrunner.errors import ModelError
    from mlxrunner.llm.model import LanguageModel

    source = store.resolve(name, models_dir)
    detected = detect(source)
    if detected.mode is not Mode.LLM:
        raise ModelError(f"{name} is a {detected.mode.value} model, not an LLM")
    return LanguageModel(source)

"""What the runner needs from a model, by mode, and the loaded model the server holds.

Three interfaces, met structurally by the model classes (nothing here imports them at run time,
so this module stays light):

- `Embedder`: texts -> vectors (embed.bert.BertEmbedder; an LLM is one too, see TextModel);
- `TextModel`: a decoder LLM (llm.model.LanguageModel): text generation, plus decoder embeddings;
- `ImageModel`: an image pipeline (imagegen's ZImagePipeline, Flux2KleinPipeline): prompt -> image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Protocol, Sequence, TypeVar, runtime_checkable

from mlxrunner.detect import Detected, Mode

if TYPE_CHECKING:
    from PIL import Image

    from mlxrunner.embed.bert import EmbeddingResult
    from mlxrunner.imagegen.pipeline import GeneratedImage, Progress
    from mlxrunner.llm.answer import Completion, TokenLogprob
    from mlxrunner.request import Options
    from mlxrunner.text.chat_template import ChatTemplate
    from mlxrunner.text.json_schema import CompiledSchema
    from mlxrunner.worker import Batch

# Called between steps of a job (batches, tokens); raises errors.Cancelled once the job is cancelled.
CheckCancelled = Callable[[], None]


@runtime_checkable
class Embedder(Protocol):
    """A model that turns texts into vectors of `dims` floats."""

    dims: int

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids; a ValueError for an id outside the vocabulary."""

    def embed(self, texts: list[str], normalize: bool | None = None, truncate: bool = True,
              check_cancelled: CheckCancelled | None = None) -> EmbeddingResult:
        """One vector per text. normalize None: as the model folder says. An input longer than the model
        takes is cut when `truncate`, else embed.bert.InputTooLong."""


@runtime_checkable
class TextModel(Embedder, Protocol):
    """A decoder LLM. Its embeddings are its last token's final hidden state."""

    context_length: int
    chat_template: ChatTemplate | None  # None: the model has none (chat requests are refused)
    batch: Batch | None  # requests that run side by side decode together here (llm/batch.py); None: one at a time

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as `stream` feeds it: BOS first iff the tokenizer adds one."""

    def stream(self, prompt: str | list[int], options: Options = ...,
               check_cancelled: CheckCancelled | None = None,
               stop_token_ids: Collection[int] = (), top_logprobs: int | None = None, json_output: bool = False,
               json_schema: CompiledSchema | None = None) -> Iterator[str | TokenLogprob | Completion]:
        """Text chunks (valid UTF-8, stop strings withheld), then one Completion. A prompt that does not
        fit the context is llm.model.PromptTooLong; a list of ids is used as it is, a string is encoded with
        the tokenizer's BOS. stop_token_ids end the answer as the tokenizer's EOS ids do. With top_logprobs
        (k >= 0), each token's TokenLogprob comes before its text. json_output: the answer is one JSON object
        and ends with it; json_schema: one the schema allows (text/json_schema.py); run either in a job outside the
        batch."""

    def generate(self, prompt: str | list[int], **options: object) -> Iterator[str]:
        """Text chunks only; options as a /completion request's `options`."""


@runtime_checkable
class ImageModel(Protocol):
    """An image pipeline: a prompt (and reference images, for models that edit) -> one image."""

    architecture: str

    def run(self, prompt: str, *, width: int | None = None, height: int | None = None, steps: int | None = None,
            seed: int | None = None, negative_prompt: str | None = None, guidance: float | None = None,
            images: Sequence[Image.Image] | None = None, latents: object = None,
            progress: Progress | None = None, check_cancelled: CheckCancelled | None = None,
            cache_threshold: float | None = None, vae_tile: int | None = None) -> GeneratedImage:
        """The image and how it was made. None = the model's default; `progress(step, total)` is called
        before each denoising step and may raise to stop the run; `check_cancelled()` likewise between
        transformer blocks and the VAE decoder's blocks. `cache_threshold`: the step cache's, None = off; `vae_tile`:
        the VAE's tile in pixels, None = by size, 0 = one pass."""

    def warm_up(self) -> tuple[int, float]:
        """One small run at load, so the first request is not slower than the rest: (image side, seconds)."""


M = TypeVar("M", TextModel, Embedder, ImageModel)


@dataclass(frozen=True)
class LoadedModel:
    """A model the runner has loaded, what it is, and how long loading took."""

    name: str
    detected: Detected
    model: TextModel | Embedder | ImageModel
    seconds: float

    @property
    def mode(self) -> Mode:
        return self.detected.mode

    @property
    def text_model(self) -> TextModel:
        return self._as(TextModel, "a text-generation")

    @property
    def embedder(self) -> Embedder:
        """The model as an embedder: an embedding model, or an LLM (decoder embeddings)."""
        return self._as(Embedder, "an embedding")

    @property
    def image_model(self) -> ImageModel:
        return self._as(ImageModel, "an image")

    def _as(self, interface: type[M], what: str) -> M:
        # Callers pick the interface from the mode first (the server's route table); this is the check
        # that keeps a mistake there from calling a method the model does not have.
        if not isinstance(self.model, interface):
            raise TypeError(f"{self.name} is not {what} model (its mode: {self.mode.value})")
        return self.model

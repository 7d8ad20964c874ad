"""POST /v1/images/generations and POST /v1/images/edits: image models on OpenAI's wire.

Generations take JSON; edits take multipart/form-data as the `openai` client sends it: the reference images
as file parts named `image` (one) or `image[]` (several), every other field as a text part (`n="2"`), which is
converted to the type the JSON route takes. Images come back in base64 (`b64_json`), as PNG unless
`output_format` asks for JPEG or WebP; there is no file server, so `response_format: "url"` is refused. n images
are n runs, one job: image i is made with seed + i when a seed is given, so each image of a request can be made
again alone.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from mlxrunner.errors import RequestError
from mlxrunner.http.openai_replies import loaded_model
from mlxrunner.http.openai_types import (
    ImageRequest,
    ImagesResponse,
    form_fields_as_json,
    parse_image_request,
)
from mlxrunner.request import INT64_MAX, Limits
from mlxrunner.worker import JobContext

if TYPE_CHECKING:
    from mlxrunner.http.server import Server
    from mlxrunner.models import ImageModel

# The pipelines that take reference images; the others would ignore them.
EDITING_ARCHITECTURES = {"Flux2KleinPipeline"}
IMAGE_PARTS = ("image", "image[]")


class ImageRoutes:
    def __init__(self, server: Server):
        self.server = server

    async def generations(self, request: web.Request) -> web.Response:
        body = await self.server.read_json(request)
        loaded = loaded_model(self.server, request)
        req = parse_image_request(body, self.server.limits)
        pngs = await self.server.run("images", image_job(loaded.image_model, req, self.server.limits))
        return web.json_response(ImagesResponse(await encoded(pngs), req.output_format).to_json())

    async def edits(self, request: web.Request) -> web.Response:
        loaded = loaded_model(self.server, request)
        if loaded.image_model.architecture not in EDITING_ARCHITECTURES:
            raise RequestError(f"{loaded.name} does not edit images: use /v1/images/generations", field="image")
        fields, images = await read_edit_form(request, self.server.limits)
        req = parse_image_request(form_fields_as_json(fields), self.server.limits, images)
        pngs = await self.server.run("images", image_job(loaded.image_model, req, self.server.limits))
        return web.json_response(ImagesResponse(await encoded(pngs), req.output_format).to_json())


async def read_edit_form(request: web.Request, limits: Limits) -> tuple[dict[str, str], list[bytes]]:
    """The text fields and the reference images' bytes of a multipart/form-data edit request."""
    if request.content_type != "multipart/form-data":
        raise RequestError(f"/v1/images/edits takes multipart/form-data (as the openai client sends it), "
                           f"not {request.content_type}", field="image")
    form = await request.post()  # bounded by the app's client_max_size: a larger body is a 413
    fields: dict[str, str] = {}
    images: list[bytes] = []
    for name, value in form.items():
        if name in IMAGE_PARTS:
            if isinstance(value, str):
                raise RequestError(f'field "{name}" must be an image file, not text', field="image")
            images.append(value.file.read())
        elif isinstance(value, str):
            fields[name] = value
    if not images:
        raise RequestError('field "image" is required: one or more image files', field="image")
    if len(images) > limits.max_images:
        raise RequestError(f'field "image" has {len(images)} images; the maximum is {limits.max_images}',
                           field="image")
    return fields, images


async def encoded(pngs: list[Future[bytes]]) -> list[str]:
    """The job's PNGs once their thread has encoded them, as base64 text."""
    return [png.decode("ascii") for png in await asyncio.gather(*map(asyncio.wrap_future, pngs))]


def image_job(model: ImageModel, req: ImageRequest, limits: Limits) -> Callable[[JobContext], list[Future[bytes]]]:
    """The worker job: req.n images, each handed to the PNG thread as soon as it is made (image i is
    encoded while image i + 1 denoises)."""
    from mlxrunner.imagegen import images as image_io

    def generate(ctx: JobContext) -> list[Future[bytes]]:
        def progress(step: int, total: int) -> None:
            ctx.check_cancelled()  # raises Cancelled through the C++ loop: the job stops here

        references = image_io.decode_request_images(req.images, limits) or None
        pngs = []
        for index in range(req.n):
            seed = None if req.seed is None else (req.seed + index) % (INT64_MAX + 1)
            result = model.run(req.prompt, width=req.width, height=req.height, steps=req.steps, seed=seed,
                               negative_prompt=req.negative_prompt, guidance=req.guidance, images=references,
                               progress=progress, check_cancelled=ctx.check_cancelled,
                               cache_threshold=req.cache_threshold, vae_tile=req.vae_tile)
            pngs.append(image_io.on_png_thread(image_io.encoded_base64, result.image, req.output_format,
                                               req.output_quality, result.png_text(req.prompt)))
        return pngs

    return generate

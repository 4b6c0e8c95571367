"""POST /v1/images/edits: OpenAI's Images edit API (`client.images.edit`) on the edit pipelines and Qwen-Image 2.1.

The body is multipart/form-data, as OpenAI's: the image files as `image` (one) or `image[]` (several, in order), and
beside them the fields of /v1/images/generations as text: prompt, n, size, response_format, and fastdit's extensions
negative_prompt, num_inference_steps, true_cfg_scale, seed and loras (a JSON list, or the `loras[][name]` /
`loras[][scale]` fields the openai client makes of `extra_body={"loras": [...]}`). `size` defaults to "auto": the
pipeline's size for the images (`output_size`: Edit, the first image's aspect ratio at its VAE area; Edit-2509 /
2511, the last one's; Qwen-Image 2.1, the last one's at its output resolution). OpenAI fields with no use here
(quality, background, input_fidelity, output_format, ...) are accepted and ignored; an inpainting `mask` is refused.

Each upload is checked before the request is queued, and a failure is a 400 naming the field, never a 500: an image
field that is no file, a file that is no image (or a truncated one), more than MAX_UPLOAD_PIXELS pixels, more images
than the model takes, a model that edits no images. The whole body is bounded by the server's --max-upload-mb (413
beyond; the app's guard reads it). Requests then share the generations' queue, batches and metrics: jobs batch when
their images are the same files (`image_key`, a digest of the uploads) and their size, steps, CFG and adapters match.

POST /v1/images/edits/stream takes the same body and answers server-sent events as /v1/images/generations/stream
(the web page's edit mode).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from fastdit.server.schema import ERROR_RESPONSES, ApiError, ImageEditRequest, ImagesResponse
from fastdit.validation import InputError, decode_image

EDIT_PATHS = ("/v1/images/edits", "/v1/images/edits/stream")
DEFAULT_MAX_UPLOAD_BYTES = 32 << 20  # a whole edit request; `fastdit serve --max-upload-mb`
MAX_UPLOAD_PIXELS = 6144 * 6144  # per image, read from its header before it is decoded
MAX_CONDITION_IMAGES = 4  # for a pipeline without a fixed limit (Qwen-Image 2.1)
IMAGE_FIELDS = ("image", "image[]")
MAX_FORM_FILES, MAX_FORM_FIELDS = 16, 64
NO_EDITS = "this model does not edit images (it is a text-to-image model); use POST /v1/images/generations"


def image_limit(generator) -> int:
    """How many images a request may upload to `generator` (0: it edits none)."""
    max_images = getattr(generator, "max_images", 0)
    return MAX_CONDITION_IMAGES if max_images is None else max_images


def _invalid(loc: tuple, message: str) -> RequestValidationError:
    """A 400 through the app's validation-error answer, which names the field at `loc`."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": "invalid_value"}])


def _loras(fields: dict[str, list[str]]) -> list | None:
    """The `loras` field: a JSON list of {"name", "scale"}, or the openai client's `loras[][name]` and
    `loras[][scale]` fields (scales for none or for every name, in order)."""
    if "loras" in fields:
        try:
            return json.loads(fields["loras"][-1])
        except json.JSONDecodeError as e:
            raise _invalid(("loras",), f'loras: must be a JSON list such as [{{"name": "style"}}] ({e})') from None
    names, scales = fields.get("loras[][name]", []), fields.get("loras[][scale]", [])
    if not names and not scales:
        return None
    if scales and len(scales) != len(names):
        raise _invalid(("loras",), "loras: give a scale for every adapter or for none")
    try:
        return [
            {"name": n, **({"scale": float(s)} if scales else {})} for n, s in zip(names, scales or names, strict=True)
        ]
    except ValueError:
        raise _invalid(("loras",), "loras: each scale must be a number") from None


async def read_edit_form(request: Request) -> tuple[ImageEditRequest, list[tuple[str, str, bytes]]]:
    """The request's fields (validated) and its image uploads as (field, file name, bytes), in order."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(
            400,
            "send the images and fields as multipart/form-data, as the openai client's images.edit does "
            f"(got {content_type or 'no content type'})",
            code="unsupported_content_type",
        )
    fields: dict[str, list[str]] = {}
    uploads = []
    async with request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS) as form:  # closes spooled files
        for key, value in form.multi_items():
            if key == "mask":
                message = "mask: inpainting masks are not supported"
                raise ApiError(400, message, param="mask", code="unsupported_value")
            if key in IMAGE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise ApiError(400, f"{key} must be an image file, not a text field", param="image")
                uploads.append((key, value.filename or "", await value.read()))
            elif isinstance(value, str):
                fields.setdefault(key, []).append(value)
    body = {key: values[-1] for key, values in fields.items() if not key.startswith("loras")}
    loras = _loras(fields)
    if loras is not None:
        body["loras"] = loras
    try:
        return ImageEditRequest.model_validate(body), uploads
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def decode_uploads(uploads: list[tuple[str, str, bytes]]) -> tuple[tuple, str]:
    """The uploads decoded (CPU work: run it off the event loop) and their digest; ApiError 400 naming the field."""
    images, digest = [], hashlib.sha256()
    for k, (field, name, data) in enumerate(uploads):
        what = field if len(uploads) == 1 else f"{field} {k}"
        try:
            images.append(decode_image(data, f"{what} ({name or 'unnamed'})", MAX_UPLOAD_PIXELS))
        except InputError as e:
            raise ApiError(400, str(e), param=field, code="invalid_image") from None
        digest.update(hashlib.sha256(data).digest())
    return tuple(images), digest.hexdigest()


def add_edit_routes(app: FastAPI, engine, *, submit: Callable, answer: Callable, answer_stream: Callable) -> None:
    """The edit routes, on the app's own `submit(body, streaming=, images=, image_key=) -> Job`, `answer(job,
    response_format, request)` and `answer_stream(job, response_format, request)`."""
    form_schema = {
        "type": "object",
        "required": ["image", "prompt"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "one image (several: image[])"},
            "image[]": {"type": "array", "items": {"type": "string", "format": "binary"}},
            **{k: v for k, v in ImageEditRequest.model_json_schema()["properties"].items() if k != "loras"},
            "loras": {"type": "string", "description": 'a JSON list such as [{"name": "style", "scale": 0.8}]'},
        },
    }
    openapi = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form_schema}}}}

    async def edit_job(request: Request, streaming: bool):
        body, uploads = await read_edit_form(request)
        if not uploads:
            message = "image is required: upload the image file as `image` (several: `image[]`)"
            raise ApiError(400, message, param="image", code="missing_image")
        if engine.ready.is_set():  # else submit answers 503
            limit = image_limit(engine.generator)
            if limit == 0:
                raise ApiError(400, NO_EDITS, param="image", code="unsupported_model")
            if len(uploads) > limit:
                message = f"image: this model takes at most {limit} images; {len(uploads)} were uploaded"
                raise ApiError(400, message, param="image", code="too_many_images")
        images, key = await asyncio.to_thread(decode_uploads, uploads)
        return submit(body, streaming=streaming, images=images, image_key=key), body.response_format

    @app.post("/v1/images/edits", response_model=ImagesResponse, responses=ERROR_RESPONSES, openapi_extra=openapi)
    async def edit_image(request: Request):
        """OpenAI's `images.edit`: the uploaded images edited as the prompt says."""
        job, response_format = await edit_job(request, streaming=False)
        return await answer(job, response_format, request)

    @app.post(
        "/v1/images/edits/stream",
        responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
        response_class=StreamingResponse,
        openapi_extra=openapi,
    )
    async def edit_image_stream(request: Request):
        """Like /v1/images/edits, answered as server-sent events (as /v1/images/generations/stream)."""
        job, response_format = await edit_job(request, streaming=True)
        return answer_stream(job, response_format, request)

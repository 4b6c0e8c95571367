"""The server's request and response bodies (OpenAI's Images API plus fastdit's extensions) and its errors.

Every value rule is fastdit.validation's, the one the CLI and the Python API apply: steps in [1, MAX_STEPS],
true_cfg_scale in [1, 100], seeds in [0, 2**63), sides multiples of 16. A broken rule is a pydantic error whose
message is the validation layer's sentence, which the app answers as an OpenAI-style 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fastdit.server.lora import LoraChoice
from fastdit.validation import (
    MAX_CFG_SCALE,
    MAX_STEPS,
    PIXELS_PER_TOKEN,
    SEED_LIMIT,
    InputError,
    check_cfg_scale,
    check_prompts,
    check_seed,
    check_steps,
)

MAX_PROMPT_CHARS = 8192
MAX_N = 10  # OpenAI's limit for n
SIZE = re.compile(r"(\d+)x(\d+)")


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "Invalid request; error.param names the field"),
        (401, "Missing or wrong API key (the server was started with --api-key)"),
        (413, "Request body too large"),
        (429, "Queue full; see Retry-After"),
        (500, "Image generation failed"),
        (503, "Server shutting down"),
    ]
}


def _checked(check, value, *args):
    """Run a fastdit.validation check; its InputError becomes a pydantic error with the same sentence."""
    try:
        return check(value, *args)
    except InputError as e:
        raise PydanticCustomError("invalid_value", "{message}", {"message": str(e)}) from None


class ImageGenerationRequest(BaseModel):
    """OpenAI's image generation body. A null field means its default (the `openai` client sends
    nulls for fields passed as None); unknown OpenAI fields (quality, style, background, ...) are
    accepted and ignored."""

    # strict: JSON true is not the integer 1, nor "1" a number.
    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int | None = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(
        "1024x1024",
        description="'WxH' in pixels, each side a multiple of 16 and at most the server's --max-size; 'auto' means "
        "1024x1024",
        json_schema_extra={"pattern": f"^(auto|{SIZE.pattern})$"},  # documented; checked by _size_is_wxh
    )
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    model: str | None = Field(None, description="Accepted and ignored: the server serves one model")
    user: str | None = Field(None, description="Accepted and ignored")
    stream: bool | None = Field(None, description="Must be false; use /v1/images/generations/stream")
    # fastdit extensions; their bounds are documented in the schema and checked by fastdit.validation
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="' ' for an empty one")
    # Unset: the server's schedule decides (50 steps, CFG 4.0; with `--scheduler lightning` 8 steps, CFG off).
    num_inference_steps: int | None = Field(None, json_schema_extra={"minimum": 1, "maximum": MAX_STEPS})
    true_cfg_scale: float | None = Field(
        None,
        description="CFG runs when it is above 1 and a negative prompt is given",
        json_schema_extra={"minimum": 1, "maximum": MAX_CFG_SCALE},
    )
    seed: int | None = Field(
        None,
        description="Image i of the request uses seed + i",
        json_schema_extra={"minimum": 0, "maximum": SEED_LIMIT - 1},
    )
    loras: list[LoraChoice] | None = Field(None, description="Preloaded LoRA adapters to apply (GET /v1/loras)")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        return _checked(check_prompts, prompt)[0]

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt(cls, negative: str | None) -> str | None:
        return negative if negative is None else _checked(check_prompts, negative, "negative_prompt", True)[0]

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, steps: int | None) -> int | None:
        return steps if steps is None else _checked(check_steps, steps)

    @field_validator("true_cfg_scale")
    @classmethod
    def _cfg_scale(cls, scale: float | None) -> float | None:
        return scale if scale is None else _checked(check_cfg_scale, scale)

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int | None) -> int | None:
        return seed if seed is None else _checked(check_seed, seed, 1)

    @field_validator("size")
    @classmethod
    def _size_is_wxh(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return size
        match = SIZE.fullmatch(size)
        if match is None:
            raise PydanticCustomError("invalid_size", "size must be 'WxH' (for example '1024x1024') or 'auto'")
        if int(match[1]) % PIXELS_PER_TOKEN or int(match[2]) % PIXELS_PER_TOKEN:
            raise PydanticCustomError(
                "invalid_size", f"size {size}: width and height must be multiples of {PIXELS_PER_TOKEN}"
            )
        return size

    @model_validator(mode="after")
    def _null_means_default(self) -> ImageGenerationRequest:
        for name, info in type(self).model_fields.items():
            if getattr(self, name) is None and info.default is not None:
                setattr(self, name, info.default)
        return self

    def width_height(self) -> tuple[int, int]:
        if self.size in (None, "auto"):
            return 1024, 1024
        width, height = self.size.split("x")
        return int(width), int(height)


class ImageEditRequest(ImageGenerationRequest):
    """OpenAI's image edit fields, sent as multipart/form-data beside the image files (fastdit.server.edits): text
    values parsed as their types ("2" is the integer 2). `size` "auto" (the default) is the pipeline's choice from the
    images."""

    model_config = ConfigDict(extra="ignore", strict=False)

    size: str | None = Field(
        "auto",
        description="'WxH' in pixels, each side a multiple of 16 and at most the server's --max-size; 'auto' (the "
        "default): the pipeline's size for the images (about the VAE area at the reference's aspect ratio)",
        json_schema_extra={"pattern": f"^(auto|{SIZE.pattern})$"},
    )

    def width_height(self) -> tuple[int, int] | None:
        """(width, height), or None for "auto"."""
        return None if self.size in (None, "auto") else super().width_height()


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastdit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

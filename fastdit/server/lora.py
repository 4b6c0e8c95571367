"""LoRA in the server: adapters preloaded by name (`fastdit serve --lora NAME=PATH[:SCALE]`), chosen per request.

- A request picks adapters with the extension field `"loras": [{"name": "style", "scale": 0.8}, ...]` (scale
  omitted: the one given at start). An unknown or repeated name is a 400 naming the field (`loras.0.name`).
  Without the field, a request runs the base model.
- The set is part of the engine's `BatchKey`: requests with different sets never share a pipeline call (the
  dynamic path applies one set to a whole batch; it has no per-sample adapters). Before each call the generator
  makes the batch's set active (`set_loras`: the stacked factors rewritten in place, no recompile).
- At start every adapter is activated once, all together, so each layer's stacked factors get the capacity of
  the largest set a request can ask for: no request later grows them (no new shape, no recompile, no new CUDA
  graph), at the price of side GEMMs as wide as all adapters' ranks together whenever any adapter is active.
- With `--fuse-lora` the adapters are merged into the weights at start and apply to every request; a request
  that names adapters is then refused (400).
- `GET /v1/loras` lists the adapters: name, default scale, rank, whether merged.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

MAX_REQUEST_LORAS = 8


class LoraChoice(BaseModel):
    """One adapter of a request's `loras` field."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=256)
    scale: float | None = Field(None, ge=-16.0, le=16.0, allow_inf_nan=False, description="Default: the server's")


class LoraGenerator:
    """The pipeline, with calls that take the batch's adapters: `loras={name: scale}` (None: none)."""

    def __init__(self, pipe, defaults: dict[str, float], fused: bool):
        self.pipe, self.defaults, self.fused = pipe, dict(defaults), fused

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __call__(self, prompt, *, loras: dict[str, float] | None = None, **kwargs):
        if not self.fused:
            self.pipe.set_loras(loras or {})
        return self.pipe(prompt=prompt, **kwargs)

    def lora_catalog(self) -> list[dict]:
        return [
            {"name": a["name"], "scale": self.defaults[a["name"]], "rank": a["rank"], "fused": self.fused}
            for a in self.pipe.lora_adapters()
        ]


def serve_loras(pipe, options, loras: dict | None = None):
    """Load the `--lora` adapters of `options` (a fastdit.cli.common.ModelOptions) into `pipe`; returns the
    generator the engine runs (the pipeline itself without adapters)."""
    from fastdit.cli.lora import apply_loras

    if not options.loras:
        return pipe
    apply_loras(pipe, options.loras, options.fuse_lora, loras)  # all active at once: the largest capacity
    if not options.fuse_lora:
        pipe.set_loras({})
    return LoraGenerator(pipe, {spec.name: spec.scale for spec in options.loras}, options.fuse_lora)


def _catalog(engine) -> LoraGenerator | None:
    generator = engine.generator
    if not isinstance(generator, LoraGenerator):
        generator = getattr(generator, "pipe", None)  # a multi-rank server's rank-0 Leader holds it as .pipe
    return generator if isinstance(generator, LoraGenerator) else None


def _invalid(loc: tuple, message: str) -> RequestValidationError:
    """A 400 through the app's validation-error answer, which names the field at `loc`."""
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": "invalid_lora"}])


def request_loras(choices: list[LoraChoice] | None, engine) -> tuple[tuple[str, float], ...]:
    """A request's `loras` field checked against the preloaded adapters: ((name, scale), ...) sorted by name."""
    if not choices:
        return ()
    catalog = _catalog(engine)
    if catalog is None:
        raise _invalid(("loras",), "loras: this server has no LoRA adapters (start it with --lora NAME=PATH)")
    if catalog.fused:
        raise _invalid(("loras",), "loras: the server's adapters are merged into its weights (--fuse-lora)")
    if len(choices) > MAX_REQUEST_LORAS:
        raise _invalid(("loras",), f"loras: at most {MAX_REQUEST_LORAS} adapters per request")
    chosen: dict[str, float] = {}
    for i, choice in enumerate(choices):
        if choice.name not in catalog.defaults:
            available = ", ".join(sorted(catalog.defaults))
            raise _invalid(("loras", i, "name"), f"no LoRA adapter named {choice.name!r} (available: {available})")
        if choice.name in chosen:
            raise _invalid(("loras", i, "name"), f"LoRA adapter {choice.name!r} is named twice")
        chosen[choice.name] = catalog.defaults[choice.name] if choice.scale is None else choice.scale
    return tuple(sorted(chosen.items()))


def add_lora_routes(app: FastAPI, engine) -> None:
    """GET /v1/loras: the preloaded adapters (empty until the model is loaded, or without --lora)."""

    @app.get("/v1/loras")
    async def list_loras():
        catalog = _catalog(engine)
        return {"object": "list", "data": [] if catalog is None else catalog.lora_catalog()}

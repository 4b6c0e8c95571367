"""Loading a diffusers-format pipeline folder's parts, shared by every pipeline's `from_pretrained`.

The order keeps every check before any weight is read: the folder (every listed component), the scheduler config,
the attention backend, the memory plan; then the DiT (`fastdit.load`: checkpoint, quantization, parallelism, the
plan's placement) and the libraries' parts (text encoder, tokenizer / processor, VAE), the text encoder into host
memory when the plan offloads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdit.checkpoint import default_device, read_json
from fastdit.errors import CheckpointError, FastditError
from fastdit.kernels.attention import resolve_backend
from fastdit.load import load_transformer
from fastdit.memory import attach, plan_memory
from fastdit.models.layers import set_attention_backend
from fastdit.pipelines.folder import check_pipeline_folder
from fastdit.pipelines.scheduler import check_scheduler_config

log = logging.getLogger("fastdit")

# The parts the libraries load (the DiT and the scheduler config are fastdit's).
LIBRARY_PARTS = ("tokenizer", "processor", "text_encoder", "vae")


def load_components(
    root: Path,
    classes: dict[str, tuple[str, str]],
    dtype: torch.dtype,
    device: torch.device,
    host: tuple[str, ...] = (),
) -> dict:
    """The text encoder, tokenizer, processor and VAE of `classes` ({name: (library, class)}), loaded with their
    libraries; the components named in `host` into host memory (a memory plan brings them to `device`)."""
    import diffusers
    import transformers

    out = {}
    try:
        for name in LIBRARY_PARTS:
            if name not in classes:
                continue
            library, cls = classes[name]
            module = transformers if library == "transformers" else diffusers
            loader = getattr(module, cls, None)
            if loader is None:
                raise CheckpointError(f"{root / 'model_index.json'}: {library} has no class {cls} (for {name})")
            if name in ("tokenizer", "processor"):
                out[name] = loader.from_pretrained(root / name)
            elif library == "transformers":
                target = "cpu" if name in host else device
                out[name] = loader.from_pretrained(root / name, dtype=dtype).to(target).eval()
            else:
                target = "cpu" if name in host else device
                out[name] = loader.from_pretrained(root / name, torch_dtype=dtype).to(target).eval()
    except (OSError, ValueError) as e:
        if isinstance(e, FastditError):
            raise
        raise CheckpointError(f"cannot load {root}: {' '.join(str(e).split())}") from e
    return out


@dataclass
class PipelineParts:
    """A loaded folder, ready for the pipeline's constructor (`build`)."""

    transformer: object
    components: dict  # the library parts the pipeline lists
    scheduler_config: dict
    plan: object  # fastdit.memory.MemoryPlan or None
    device: torch.device
    dtype: torch.dtype

    def build(self, cls, **extra):
        """`cls(...)` on these parts (plus `extra` constructor arguments), with the plan's run-time placement."""
        pipe = cls(
            transformer=self.transformer,
            scheduler_config=self.scheduler_config,
            device=self.device,
            dtype=self.dtype,
            **self.components,
            **extra,
        )
        pipe.memory = attach(self.plan, pipe.text_encoder, self.device)
        return pipe


def load_parts(
    root: Path,
    components: tuple[str, ...],
    *,
    dtype: torch.dtype,
    device,
    parallel=None,
    quantize: str | None = None,
    attention: str = "auto",
    memory=None,
    plans: tuple[str, ...],
    config_type: type | None = None,
) -> PipelineParts:
    """Check and load the pipeline folder `root`, which must list `components`; only those are loaded.
    `config_type`: the DiT config class the pipeline runs (a folder with another DiT is a CheckpointError).
    `plans`: the memory plans the pipeline runs; the other arguments as `QwenImagePipeline.from_pretrained`'s."""
    classes = check_pipeline_folder(root, components)
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    check_scheduler_config(scheduler_config)
    device = torch.device(device) if device is not None else default_device()
    resolve_backend(attention, device)  # an unavailable backend fails before any weight is read
    plan = plan_memory(
        memory, root, dtype=dtype, device=device, quantize=quantize, parallel=parallel, say=log.info, order=plans
    )
    transformer = load_transformer(
        root / "transformer", dtype=dtype, device=device, quantize=quantize, parallel=parallel, memory=plan
    )
    if config_type is not None and not isinstance(transformer.cfg, config_type):
        raise CheckpointError(
            f"{root / 'transformer' / 'config.json'}: its DiT is no {config_type.__name__} model, which this "
            "pipeline runs"
        )
    set_attention_backend(transformer.base, attention)
    if "processor" in components:
        from fastdit.tiny.vl import allow_vl_processors_without_torchvision

        allow_vl_processors_without_torchvision()  # images only: the processor's video slot needs no torchvision
    host = ("text_encoder",) if plan is not None and plan.offload_text else ()
    listed = {name: classes[name] for name in components if name in classes}
    parts = load_components(root, listed, dtype, device, host)
    return PipelineParts(transformer, parts, scheduler_config, plan, device, dtype)

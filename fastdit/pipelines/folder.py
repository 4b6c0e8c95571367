"""Checking a diffusers-format pipeline folder before anything is loaded.

A missing or broken file deep inside a component otherwise surfaces as whatever the loading library does
with it: a 70-line traceback, or (a text encoder without config.json) transformers building a default-size
model in host memory until the kernel kills the process. `check_pipeline_folder` reads only small files
(model_index.json, the components' JSON configs, safetensors headers), builds the text encoder and VAE on the
meta device to compare their size with their weights, and reports the first problem as one `CheckpointError`
naming the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import SafetensorError, safe_open

from fastdit.checkpoint import read_json
from fastdit.errors import CheckpointError

# The file a component's loader reads its settings from, by the library class named in model_index.json; any
# class not listed is checked for config.json.
_CONFIG_FILE = {
    "FlowMatchEulerDiscreteScheduler": "scheduler_config.json",
    "Qwen2Tokenizer": "tokenizer_config.json",
    "Qwen2TokenizerFast": "tokenizer_config.json",
    "Qwen2VLProcessor": "preprocessor_config.json",
    "Qwen3VLProcessor": "preprocessor_config.json",
}
# Components with weights: the safetensors file or index each library writes.
_WEIGHTS = {
    "transformers": ("model.safetensors", "model.safetensors.index.json"),
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
}
_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# model_index.json entries that are pipeline settings (a pipeline's register_to_config), not components.
SETTINGS = ("sample_sigmas",)


def read_model_index(root: Path) -> dict:
    """model_index.json of a pipeline folder; CheckpointError naming what is missing or malformed."""
    if not root.exists():
        raise CheckpointError(f"model folder does not exist: {root}")
    if not root.is_dir():
        raise CheckpointError(f"model path is not a folder: {root}")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{root} is not a diffusers pipeline folder: {index_file.name} is missing")
    index = read_json(index_file)
    if not isinstance(index.get("_class_name"), str):
        raise CheckpointError(f"{index_file} names no pipeline class (_class_name)")
    return index


def components(index: dict) -> dict[str, tuple[str, str]]:
    """name -> (library, class) of each component model_index.json lists (entries set to null are absent)."""
    out = {}
    for name, entry in index.items():
        if name.startswith("_") or name in SETTINGS or entry is None or entry == [None, None]:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise CheckpointError(f"model_index.json: entry {name!r} must be [library, class], got {entry!r}")
        out[name] = (entry[0], entry[1])
    return out


def _check_json(path: Path):
    """The parsed content of the JSON file `path`; CheckpointError if it is missing or malformed."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _check_weights(folder: Path, library: str) -> None:
    single, index_name = _WEIGHTS[library]
    index = folder / index_name
    if index.exists():
        try:
            shards = set(read_json(index)["weight_map"].values())
        except (KeyError, AttributeError, TypeError):
            raise CheckpointError(f"{index} has no weight_map") from None
        for shard in sorted(shards):
            _check_safetensors(folder / shard)
        return
    if not (folder / single).exists():
        raise CheckpointError(f"{folder / single} is missing (no weights for {folder.name}/)")
    _check_safetensors(folder / single)


def _check_tokenizer(folder: Path) -> None:
    if (folder / "tokenizer.json").is_file():
        content = _check_json(folder / "tokenizer.json")
        if not isinstance(content, dict) or not {"model", "added_tokens"} <= content.keys():
            raise CheckpointError(f"{folder / 'tokenizer.json'} is not a tokenizers file (no model / added_tokens)")
        return
    if (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file():
        _check_json(folder / "vocab.json")
        if not (folder / "merges.txt").is_file():
            raise CheckpointError(f"{folder / 'merges.txt'} is missing")
        return
    raise CheckpointError(f"{folder / 'tokenizer.json'} is missing (a tokenizer needs it, or vocab.json + merges.txt)")


def check_pipeline_folder(root: Path, required: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Check every component of the pipeline folder `root` that its model_index.json lists, and that the
    `required` ones are there. Returns the components ({name: (library, class)}); raises CheckpointError naming
    the first file that is missing or unreadable."""
    index = read_model_index(root)
    parts = components(index)
    for name in required:
        if name not in parts:
            raise CheckpointError(f"{root / 'model_index.json'} lists no {name!r} component")
    for name, (library, cls) in parts.items():
        folder = root / name
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is missing (model_index.json lists the {name} component)")
        _check_json(folder / _CONFIG_FILE.get(cls, "config.json"))
        if cls in _TOKENIZER_CLASSES:
            _check_tokenizer(folder)
        elif library in _WEIGHTS and "Processor" not in cls and "Scheduler" not in cls:
            _check_weights(folder, library)
    check_component_sizes(root, parts)
    return parts


def _stored_elements(folder: Path, library: str) -> int:
    """Elements of every tensor in a component's safetensors file(s), from their headers."""
    single, index_name = _WEIGHTS[library]
    index = folder / index_name
    shards = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else [single]
    total = 0
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                total += math.prod(f.get_slice(key).get_shape())
    return total


def check_component_size(folder: Path, library: str, model_class: type) -> None:
    """The model a component's config.json describes is not much bigger than its weights: a config that belongs to
    another model, or one the library fills with defaults (an empty one), would otherwise make it build a model
    of that size, up to the full 7B text encoder, before any weight is compared. Builds the model on the meta
    device (no memory) and compares its parameter count with the safetensors headers."""
    import torch

    config_file = folder / "config.json"
    try:
        with torch.device("meta"):
            if library == "transformers":
                model = model_class._from_config(model_class.config_class.from_pretrained(folder))
            else:
                model = model_class.from_config(model_class.load_config(folder))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        message = " ".join(str(e).split())
        raise CheckpointError(f"{config_file} does not describe a {model_class.__name__}: {message}") from None
    wanted = sum(p.numel() for p in model.parameters())
    stored = _stored_elements(folder, library)
    if wanted > stored * 3 // 2:  # a few missing tensors are reported by name when loading
        raise CheckpointError(
            f"{config_file} describes a model of {wanted:,} parameters ({model_class.__name__}), but the weights in "
            f"{folder} hold {stored:,} values: the config does not belong to these weights"
        )


def check_component_sizes(root: Path, parts: dict[str, tuple[str, str]]) -> None:
    """`check_component_size` for every component with weights loaded by transformers or diffusers (the DiT has
    its own checks in fastdit.load), before any of them loads."""
    import diffusers
    import transformers

    for name, (library, cls) in parts.items():
        if library not in _WEIGHTS or name == "transformer" or "Processor" in cls or "Scheduler" in cls:
            continue
        if cls in _TOKENIZER_CLASSES:
            continue
        model_class = getattr(transformers if library == "transformers" else diffusers, cls, None)
        if model_class is None:
            raise CheckpointError(f"{root / 'model_index.json'}: {library} has no class {cls} (for {name})")
        check_component_size(root / name, library, model_class)

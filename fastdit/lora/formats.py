"""LoRA files for the Qwen-Image family's transformers: every trainer's key layout read into one form.

A LoRA of a linear layer with weight W (out, in) stores two factors, down (rank, in) and up (out, rank),
and optionally a scalar alpha; the layer becomes `W + scale * (alpha / rank) * up @ down`, with `scale`
the strength the user picks and alpha = rank when the file has none. `read_lora` returns
`{layer: LoraWeights}` keyed by the layer's diffusers name (`transformer_blocks.1.attn.to_q`,
`img_in`, ...) whatever layout the file uses:

| layout                        | keys of one layer M                                       |
|-------------------------------|-----------------------------------------------------------|
| diffusers / PEFT              | [transformer.]M.lora_A.weight, M.lora_B.weight, [M.alpha] |
| PEFT with an adapter name     | M.lora_A.<adapter>.weight (DiffSynth-Studio: `default`)   |
| ComfyUI, ai-toolkit, musubi   | diffusion_model.M.lora_A/lora_B or .lora_down/.lora_up    |
| kohya, musubi-tuner           | lora_unet_<M with "_" for ".">.lora_down/.lora_up, .alpha |
| SimpleTuner LyCORIS-style     | lycoris_<M with "_" for ".">.lora_down/.lora_up, .alpha   |

Alpha comes from the layer's `.alpha` key; failing that, from diffusers' `lora_adapter_metadata` entry
in the safetensors header (`transformer.lora_alpha`, `transformer.alpha_pattern`, as
`QwenImagePipeline.save_lora_weights` writes it); failing that, alpha = rank.

Kohya names flatten the dots to underscores, and several layer names hold underscores of their own
(`to_add_out`, `add_q_proj`, `timestep_embedder`), so splitting on "_" is ambiguous. They are resolved
by exact lookup instead: every LoRA-able linear of each architecture is listed below (`LoraNames`: Qwen-Image's
`BLOCK_LINEARS` / `TOP_LINEARS`, Qwen-Image 2.1's `BLOCK_LINEARS_21` / `TOP_LINEARS_21`), flattened the same way,
and a name must equal one of those (after its block index).

Anything that is not a plain LoRA of a transformer linear is refused with a message naming the key:
text-encoder LoRAs, LoKr / LoHa / DoRA / full-difference (`diff`, `diff_b`) weights, and keys that
name no linear layer (norms, embeddings, other architectures).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fastdit.errors import LoraError

# The linear layers of one transformer block, in diffusers' naming (relative to `transformer_blocks.N`).
BLOCK_LINEARS = (
    "img_mod.1",
    "txt_mod.1",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
# The linear layers outside the blocks.
TOP_LINEARS = (
    "img_in",
    "txt_in",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)
# Qwen-Image 2.1's single-stream DiT: its block linears and the ones outside the blocks.
BLOCK_LINEARS_21 = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "img_mlp.gate_layer",
    "img_mlp.proj",
    "img_mlp.out",
)
TOP_LINEARS_21 = (
    "img_in",
    "txt_in.in_layer",
    "txt_in.out_layer",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "modulation.1",
    "norm_out.linear",
    "proj_out",
)
# Width of the sinusoidal timestep features that timestep_embedder.linear_1 reads.
TIMESTEP_FREQ_DIM = 256


@dataclass(frozen=True)
class LoraNames:
    """The linears of one DiT architecture a LoRA may name, in diffusers' naming; `model` names it in errors."""

    model: str
    block: tuple[str, ...]
    top: tuple[str, ...]

    def layer(self, name: str) -> str | None:
        """The diffusers name of the linear layer that `name` (dotted or kohya-flattened) denotes, else None."""
        if "." in name:
            if name in self.top:
                return name
            m = _BLOCK_DOTTED.match(name)
            return name if m and m[2] in self.block else None
        flat_top = {n.replace(".", "_"): n for n in self.top}
        if name in flat_top:
            return flat_top[name]
        m = _BLOCK_FLAT.match(name)
        flat_block = {n.replace(".", "_"): n for n in self.block}
        if m and m[2] in flat_block:
            return f"transformer_blocks.{m[1]}.{flat_block[m[2]]}"
        return None


QWEN_IMAGE = LoraNames("Qwen-Image", BLOCK_LINEARS, TOP_LINEARS)
QWEN_IMAGE_21 = LoraNames("Qwen-Image 2.1", BLOCK_LINEARS_21, TOP_LINEARS_21)


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One layer's LoRA factors, in the file's dtype. The update is `scale * alpha / rank * up @ down`."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The (out_features, in_features) float32 weight update at strength `scale`."""
        return (scale * self.alpha / self.rank) * (self.up.float() @ self.down.float())


def qwen_image_lora_targets(
    num_layers: int, dim: int, mlp_hidden: int, in_channels: int, joint_dim: int, out_dim: int
) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer a LoRA may change, keyed by diffusers' name.

    dim = heads * head_dim; mlp_hidden = 4 * dim; in_channels = packed latent channels (64 for Qwen-Image);
    joint_dim = text-encoder width (3584); out_dim = patch_size**2 * out_channels (64).
    """
    block = {
        "img_mod.1": (6 * dim, dim),  # shift/scale/gate for attention and MLP
        "txt_mod.1": (6 * dim, dim),
        "attn.to_q": (dim, dim),
        "attn.to_k": (dim, dim),
        "attn.to_v": (dim, dim),
        "attn.add_q_proj": (dim, dim),
        "attn.add_k_proj": (dim, dim),
        "attn.add_v_proj": (dim, dim),
        "attn.to_out.0": (dim, dim),
        "attn.to_add_out": (dim, dim),
        "img_mlp.net.0.proj": (mlp_hidden, dim),
        "img_mlp.net.2": (dim, mlp_hidden),
        "txt_mlp.net.0.proj": (mlp_hidden, dim),
        "txt_mlp.net.2": (dim, mlp_hidden),
    }
    targets = {
        "img_in": (dim, in_channels),
        "txt_in": (dim, joint_dim),
        "time_text_embed.timestep_embedder.linear_1": (dim, TIMESTEP_FREQ_DIM),
        "time_text_embed.timestep_embedder.linear_2": (dim, dim),
        "norm_out.linear": (2 * dim, dim),  # scale and shift of the final norm
        "proj_out": (out_dim, dim),
    }
    for i in range(num_layers):
        targets.update({f"transformer_blocks.{i}.{name}": shape for name, shape in block.items()})
    return targets


def qwen_image21_lora_targets(cfg) -> dict[str, tuple[int, int]]:
    """`qwen_image_lora_targets` for Qwen-Image 2.1, from its `QwenImage21Config`."""
    dim, hidden = cfg.dim, cfg.mlp_ratio * cfg.dim
    block = {
        "attn.to_q": (dim, dim),
        "attn.to_k": (dim, dim),
        "attn.to_v": (dim, dim),
        "attn.to_out.0": (dim, dim),
        "img_mlp.gate_layer": (hidden, dim),
        "img_mlp.proj": (hidden, dim),
        "img_mlp.out": (dim, hidden),
    }
    targets = {
        "img_in": (dim, cfg.in_channels * cfg.patch_size**2),
        "txt_in.in_layer": (dim, cfg.context_dim),
        "txt_in.out_layer": (dim, dim),
        "time_text_embed.timestep_embedder.linear_1": (dim, TIMESTEP_FREQ_DIM),
        "time_text_embed.timestep_embedder.linear_2": (dim, dim),
        "modulation.1": (4 * dim, dim),  # scale / gate of attention and MLP, shared by every block
        "norm_out.linear": (dim, dim),
        "proj_out": (cfg.patch_size**2 * cfg.out_channels, dim),
    }
    for i in range(cfg.num_layers):
        targets.update({f"transformer_blocks.{i}.{name}": shape for name, shape in block.items()})
    return targets


# `<layer>.lora_A.weight`, `<layer>.lora_down.weight`, `<layer>.lora_A.<adapter>.weight`; and `<layer>.alpha`.
_FACTOR_KEY = re.compile(
    r"^(?P<layer>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_ALPHA_KEY = re.compile(r"^(?P<layer>.+)\.alpha$")
_KIND = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}

# Adapter types other than plain LoRA, recognised so that the error can say what the file is.
_OTHER_ADAPTERS = (
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)(\.|$)"), "DoRA"),
    (re.compile(r"\.lokr_"), "LoKr"),
    (re.compile(r"\.hada_"), "LoHa"),
    (re.compile(r"\.oft_"), "OFT"),
    (re.compile(r"\.lora_mid\."), "LoCon (Tucker)"),
    (re.compile(r"\.(lora_B|lora_up)(\.[^.]+)?\.bias$"), "LoRA bias"),
    (re.compile(r"\.(diff|diff_b|set_weight)$"), "full weight/bias difference"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm-layer"),
)
_TEXT_ENCODER_KEY = re.compile(r"^(text_encoders?(_\d)?\.|lora_te\d*_)")
# Prefixes before a dotted diffusers name, and before a kohya name (dots flattened to underscores).
_DOTTED_PREFIXES = ("diffusion_model.", "transformer.")
_FLAT_PREFIXES = ("lora_unet_", "lycoris_")

_BLOCK_DOTTED = re.compile(r"^transformer_blocks\.(0|[1-9]\d*)\.(.+)$")
_BLOCK_FLAT = re.compile(r"^transformer_blocks_(0|[1-9]\d*)_(.+)$")


def _strip_prefix(key: str) -> str:
    for prefix in _DOTTED_PREFIXES + _FLAT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _is_adapter_key(key: str) -> bool:
    return bool(_FACTOR_KEY.match(key)) or any(p.search(key) for p, _ in _OTHER_ADAPTERS)


def _load_file(path: Path, source: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a .safetensors file and the LoRA metadata (diffusers' `lora_adapter_metadata`) of its header."""
    if not path.exists():
        raise LoraError(f"{source}: no such file")
    if path.is_dir():
        raise LoraError(f"{source}: is a folder; pass the LoRA's .safetensors file")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise LoraError(f"{source}: pickle checkpoints are not read; convert the LoRA to .safetensors")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    except Exception as e:  # safetensors raises its own error type, OSError or ValueError for a bad file
        raise LoraError(f"{source}: not a readable safetensors file ({e})") from None
    raw = header.get("lora_adapter_metadata")
    if raw is None:
        return tensors, None
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"{source}: lora_adapter_metadata in the header is not JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise LoraError(f"{source}: lora_adapter_metadata in the header is not a JSON object")
    return tensors, metadata


def _metadata_alpha(metadata: dict | None, layer: str, rank: int, source: str) -> float:
    """Alpha for a layer without an `.alpha` key: diffusers' adapter metadata (PEFT LoraConfig fields), else rank."""
    if not metadata:
        return float(rank)
    if metadata.get("transformer.use_dora"):
        raise LoraError(f"{source}: DoRA adapters are not supported (lora_adapter_metadata sets use_dora)")
    alpha = metadata.get("transformer.lora_alpha", rank)
    # PEFT matches a pattern against the layer name or any dotted suffix of it; the first match wins.
    for pattern, value in (metadata.get("transformer.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            alpha = value
            break
    if metadata.get("transformer.use_rslora"):
        # rsLoRA scales by alpha / sqrt(rank); express it as alpha' / rank.
        alpha = alpha * math.sqrt(rank)
    return float(alpha)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _check_factors(layer: str, down: torch.Tensor, up: torch.Tensor, source: str) -> None:
    if down.ndim != 2 or up.ndim != 2:
        raise LoraError(
            f"{source}: {layer}: lora_down is {_fmt(down.shape)} and lora_up is {_fmt(up.shape)}; "
            "a LoRA of a linear layer has two 2-D factors"
        )
    if down.shape[0] != up.shape[1]:
        raise LoraError(
            f"{source}: {layer}: lora_down is {_fmt(down.shape)} (rank {down.shape[0]}) but lora_up is "
            f"{_fmt(up.shape)} (rank {up.shape[1]}); both factors must have the same rank"
        )


def read_lora(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    name_for_errors: str | None = None,
    names: LoraNames = QWEN_IMAGE,
) -> dict[str, LoraWeights]:
    """Read a LoRA (.safetensors path or in-memory state dict) into {diffusers layer name: LoraWeights}.

    Raises LoraError naming the file (`name_for_errors`, else the path) and the key or layer at fault. Layer
    names are checked against the linears of `names`' architecture but not against a model's depth or widths:
    that is `check_lora`'s job.
    """
    if isinstance(path_or_state_dict, Mapping):
        source = name_for_errors or "<state dict>"
        tensors, metadata = dict(path_or_state_dict), None
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise LoraError(f"{source}: {key} holds a {type(value).__name__} value, not a tensor")
    else:
        source = name_for_errors or str(path_or_state_dict)
        tensors, metadata = _load_file(Path(path_or_state_dict), source)
    if not tensors:
        raise LoraError(f"{source}: holds no tensors, so it is not a LoRA")
    if not any(_is_adapter_key(_strip_prefix(k)) for k in tensors):
        raise LoraError(
            f"{source}: not a LoRA: no key ends in .lora_A/.lora_B/.lora_down/.lora_up.weight "
            f"(first key: {next(iter(tensors))})"
        )

    # layer -> {"down" | "up" | "alpha": (key, tensor)}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapters: set[str] = set()
    for key, tensor in tensors.items():
        if _TEXT_ENCODER_KEY.match(key):
            raise LoraError(
                f"{source}: {key}: text-encoder LoRAs are not supported (fastdit applies LoRAs to the transformer only)"
            )
        rest = _strip_prefix(key)
        factor = _FACTOR_KEY.match(rest)
        match = factor or _ALPHA_KEY.match(rest)
        if match is None:
            for pattern, label in _OTHER_ADAPTERS:
                if pattern.search(rest):
                    raise LoraError(f"{source}: {key}: {label} weights are not supported, only plain LoRA")
            raise LoraError(
                f"{source}: {key} is not a LoRA key (expected <layer>.lora_A/.lora_B/.lora_down/.lora_up.weight "
                "or <layer>.alpha)"
            )
        layer = names.layer(match["layer"])
        if layer is None:
            raise LoraError(
                f"{source}: {key} names no linear layer of the {names.model} transformer (read as {match['layer']!r})"
            )
        if factor and factor["adapter"]:
            adapters.add(factor["adapter"])
        kind = _KIND[factor["kind"]] if factor else "alpha"
        entry = parts.setdefault(layer, {})
        if kind in entry:
            raise LoraError(f"{source}: {layer}: given twice, by {entry[kind][0]} and {key}")
        entry[kind] = (key, tensor)
    if len(adapters) > 1:
        raise LoraError(f"{source}: holds several adapters ({', '.join(sorted(adapters))}); keep one")

    loras = {}
    for layer, entry in parts.items():
        missing = [kind for kind in ("down", "up") if kind not in entry]
        if missing:
            present = ", ".join(key for key, _ in entry.values())
            raise LoraError(f"{source}: {layer}: has {present} but no lora_{missing[0]} weight")
        down, up = entry["down"][1], entry["up"][1]
        _check_factors(layer, down, up, source)
        if "alpha" in entry:
            key, value = entry["alpha"]
            if value.numel() != 1:
                raise LoraError(f"{source}: {key} has shape {_fmt(value.shape)}; alpha must be one number")
            alpha = float(value.item())
        else:
            alpha = _metadata_alpha(metadata, layer, down.shape[0], source)
        if not math.isfinite(alpha):
            raise LoraError(f"{source}: {layer}: alpha is {alpha}")
        loras[layer] = LoraWeights(down=down, up=up, alpha=alpha)
    return loras


def check_lora(loras: Mapping[str, LoraWeights], module_shapes: Mapping[str, tuple[int, int]], source: str) -> None:
    """Raise LoraError unless every layer of `loras` is in `module_shapes` ({name: (out, in)}) with fitting
    factors: down (r, in) and up (out, r)."""
    for layer, lora in loras.items():
        shape = module_shapes.get(layer)
        if shape is None:
            blocks = {int(m[1]) for name in module_shapes if (m := _BLOCK_DOTTED.match(name))}
            depth = f" (it has {len(blocks)} blocks, transformer_blocks.0-{max(blocks)})" if blocks else ""
            raise LoraError(f"{source}: {layer}: no such layer in this transformer{depth}")
        _check_factors(layer, lora.down, lora.up, source)
        out_features, in_features = shape
        layer_shape = _fmt(shape)
        if lora.up.shape[0] != out_features:
            raise LoraError(
                f"{source}: {layer}: lora_up is {_fmt(lora.up.shape)} but the layer is {layer_shape} "
                f"-> needs ({out_features}, r)"
            )
        if lora.down.shape[1] != in_features:
            raise LoraError(
                f"{source}: {layer}: lora_down is {_fmt(lora.down.shape)} but the layer is {layer_shape} "
                f"-> needs (r, {in_features})"
            )

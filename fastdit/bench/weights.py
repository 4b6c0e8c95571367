"""Full-size models with random weights for `fastdit bench` (no download), and diffusers' model on the same weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastdit.errors import FastditError
from fastdit.models.qwenimage import DiTConfig, QwenImageTransformer
from fastdit.models.qwenimage_keys import diffusers_state_dict
from fastdit.parallel.transformer import parallelize


def random_dit(cfg: DiTConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> QwenImageTransformer:
    """Build on meta, allocate on the device, fill with scaled random weights (activations stay O(1))."""
    with torch.device("meta"):
        model = QwenImageTransformer(cfg).to(dtype)  # cast on meta: never a float32 copy on the device
    model.to_empty(device=device)
    fill_random_(model, device, seed)
    return model.eval().requires_grad_(False)


def parallel_random_dit(cfg: DiTConfig, dtype: torch.dtype, state, seed: int = 0) -> QwenImageTransformer:
    """`random_dit` with this rank's tensor / sequence-parallel layers (fastdit.parallel.parallelize)."""
    with torch.device("meta"):
        model = QwenImageTransformer(cfg)
    parallelize(model, state)  # its parallel layers are created in the default dtype: cast after the swap
    model.to(dtype).to_empty(device=state.device)
    fill_random_(model, state.device, seed)
    return model.eval().requires_grad_(False)


def fill_random_(model: nn.Module, device: torch.device, seed: int) -> None:
    """Weights ~ N(0, 1 / fan_in) (a layer's whole fan-in, also for a tensor-parallel shard of it), biases
    N(0, 0.02^2), norm weights 1, modulation 10x smaller; in place, from one seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda shape: torch.randn(shape, device=device, dtype=torch.float32, generator=g)  # noqa: E731
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                name = f"{module_name}.{p_name}"
                fan_in = getattr(module, "in_features", p.shape[-1])
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("mod.lin.weight") or name.endswith("final.mod.weight"):
                    # Trained DiTs keep modulation small (AdaLN-Zero starts it at 0); full-scale random
                    # modulation makes a 60-layer stack so ill-conditioned that bf16 itself is 10% off fp32.
                    p.copy_(randn(p.shape) * 0.1 / math.sqrt(fan_in))
                elif p.ndim == 2:
                    p.copy_(randn(p.shape) / math.sqrt(fan_in))
                else:
                    p.copy_(randn(p.shape) * 0.02)


def diffusers_twin(model: QwenImageTransformer) -> nn.Module:
    """diffusers' QwenImageTransformer2DModel sharing our weight storage (views, so no extra memory)."""
    cfg = model.cfg
    config = twin_config(cfg, joint_attention_dim=cfg.joint_dim, zero_cond_t=cfg.zero_cond_t)
    return twin_of("QwenImageTransformer2DModel", config, diffusers_state_dict(model.base))


def twin_config(cfg, **family) -> dict:
    """The diffusers config keys both DiT families share, from our config `cfg`, plus the family's own."""
    shared = dict(
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    )
    return shared | family


def twin_of(class_name: str, config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' `class_name` built empty from `config` and given `state` (views of our weights) as its own."""
    try:
        import diffusers
        from accelerate import init_empty_weights
    except ImportError as e:
        raise FastditError(f"--compare diffusers needs diffusers and accelerate installed ({e})") from None
    with init_empty_weights():
        ref = getattr(diffusers, class_name)(**config)
    ref.load_state_dict(state, assign=True, strict=True)
    return ref.eval().requires_grad_(False)


def dit_inputs(cfg: DiTConfig, batch: int, height: int, width: int, text_len: int, dtype, device, seed=0):
    if height % 16 or width % 16:
        raise FastditError(f"--height/--width must be multiples of 16, got {height}x{width}")
    h, w = height // 16, width // 16  # VAE /8, then 2x2 patches
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, h * w, cfg.in_channels, device=device, generator=g).to(dtype)
    enc = torch.randn(batch, text_len, cfg.joint_dim, device=device, generator=g).to(dtype)
    t = torch.full((batch,), 0.7, device=device)
    return x, enc, t, [[(1, h, w)]] * batch

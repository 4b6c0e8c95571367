"""A faster image decode for Qwen-Image's VAE (diffusers' `AutoencoderKLQwenImage`), with the same pixels.

diffusers decodes an image as the first frame of a video. Every causal 3D convolution of the decoder pads two
zero frames in front of that one frame, so each 3x3x3 kernel does three times the work of its last 3x3 tap, the
only one that sees the image; the temporal upsamplers skip their time convolution on a first frame. With a
few-step schedule the decode is about a fifth of an image's time, so `FrameDecoder` re-expresses the decoder for
one frame on (B, C, H, W) tensors, reading the diffusers module's weights:

- a causal 3D convolution -> the 2D convolution of its last temporal tap (the zero frames add exactly 0);
- the channel RMS norms (in float32 for half inputs, as diffusers), SiLU and residuals as they are;
- the middle block's single-head attention over the H * W positions;
- an upsampler -> 2x nearest-neighbour (copies values: exact in any dtype) and its 2D convolution.

On CUDA it also keeps activations channels-last (NHWC: cuDNN's tensor-core convolutions and the channel norms
read contiguous channels) and lets cuDNN pick each convolution's algorithm by timing (`cudnn.benchmark`, scoped
to the decode: the first decode at a new size pays the search). `compile_decoder(vae)` compiles it
(`DiTPipeline.compile` does; inductor fuses each norm, SiLU and residual into one pass over the activations).

`decode_frames(vae, z)` is what the pipelines call: the fast decoder where it applies (an `AutoencoderKLQwenImage`
with its weights in memory, one frame, no tiling asked for), diffusers' decode otherwise. The 2D weights are
copies (a third of the decoder's 3D convolution weights, ~47 MB in bf16), made on first use and again if the VAE
moves to another device or dtype. Tiling is not used: without the padded frames the decode needs less memory than
diffusers' untiled one; a VAE with tiling enabled (`vae.enable_tiling()`) keeps diffusers' tiled decode.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.runtime.compile import backend as inductor_backend


@contextlib.contextmanager
def cudnn_autotune(on: bool):
    """A context in which cuDNN times its convolution algorithms for each new shape (`cudnn.benchmark`), when `on`;
    the setting is restored after it."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class UnsupportedVAE(Exception):
    """The VAE's decoder is not laid out as FrameDecoder expects; diffusers' decode runs instead."""


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


def frame_conv(conv: nn.Module) -> nn.Conv2d:
    """The 2D convolution a causal 3D convolution (diffusers' QwenImageCausalConv3d) applies to a first frame:
    its last temporal tap, with the same spatial padding."""
    if not isinstance(conv, nn.Conv3d) or not hasattr(conv, "_padding"):
        raise UnsupportedVAE(f"{type(conv).__name__} is not a causal 3D convolution")
    kt, kh, kw = conv.kernel_size
    # diffusers keeps the padding in F.pad order: (w, w, h, h, time front, time back).
    pw, pw_right, ph, ph_bottom, front, back = conv._padding
    if (front, back) != (kt - 1, 0) or conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1:
        raise UnsupportedVAE("a decoder convolution is not a stride-1 causal convolution")
    if (pw, ph) != (pw_right, ph_bottom):
        raise UnsupportedVAE("a decoder convolution pads asymmetrically in space")
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, (kh, kw), padding=(ph, pw), bias=conv.bias is not None, device="meta"
    )
    out.weight = _frozen(conv.weight[:, :, -1])  # (O, I, kh, kw): the tap that meets the frame
    if conv.bias is not None:
        out.bias = _frozen(conv.bias)
    return out


def copy_conv2d(conv: nn.Module) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedVAE(f"expected a 2D convolution, found {type(conv).__name__}")
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device="meta",
    )
    out.weight = _frozen(conv.weight)
    if conv.bias is not None:
        out.bias = _frozen(conv.bias)
    return out


class ChannelRMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (+ bias) on (B, C, H, W); the normalisation runs in float32 for
    bfloat16 / float16 inputs and is rounded back before the scale, as in diffusers."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        if not isinstance(getattr(norm, "gamma", None), nn.Parameter) or not getattr(norm, "channel_first", False):
            raise UnsupportedVAE(f"{type(norm).__name__} is not a channel-first RMS norm")
        self.scale = float(norm.scale)
        self.gamma = _frozen(norm.gamma.reshape(-1, 1, 1))  # (C, 1, 1)
        self.bias = _frozen(norm.bias.reshape(-1, 1, 1)) if isinstance(norm.bias, Tensor) else None

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        y = F.normalize(wide, dim=1).to(x.dtype) * self.scale * self.gamma
        return y if self.bias is None else y + self.bias


class ResBlock(nn.Module):
    """norm -> act -> conv -> norm -> act -> conv, plus the (1x1-projected when widths differ) input."""

    def __init__(self, block: nn.Module):
        super().__init__()
        dropout = getattr(block, "dropout", None)
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and block.training:
            raise UnsupportedVAE("a decoder block applies dropout (the VAE is in training mode)")
        self.act = block.nonlinearity
        self.norm1, self.conv1 = ChannelRMSNorm(block.norm1), frame_conv(block.conv1)
        self.norm2, self.conv2 = ChannelRMSNorm(block.norm2), frame_conv(block.conv2)
        self.shortcut = None if isinstance(block.conv_shortcut, nn.Identity) else frame_conv(block.conv_shortcut)

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        x = self.conv1(self.act(self.norm1(x)))
        x = self.conv2(self.act(self.norm2(x)))
        return x + skip


class FrameAttention(nn.Module):
    """One-head self-attention over the H * W positions of each image, added to its input."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm = ChannelRMSNorm(block.norm)
        self.to_qkv, self.proj = copy_conv2d(block.to_qkv), copy_conv2d(block.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, 3C); contiguous when channels-last
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # (B, 1, H*W, C) each
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, then the upsampler's 2D convolution (its time convolution never runs on a
    first frame)."""

    def __init__(self, resample: nn.Module):
        super().__init__()
        if resample.mode not in ("upsample2d", "upsample3d"):
            raise UnsupportedVAE(f"decoder resampler mode {resample.mode!r}")
        up = [m for m in resample.resample if isinstance(m, nn.Upsample)]
        convs = [m for m in resample.resample if isinstance(m, nn.Conv2d)]
        if len(up) != 1 or len(convs) != 1 or up[0].mode != "nearest-exact" or up[0].scale_factor != (2.0, 2.0):
            raise UnsupportedVAE("a decoder upsampler is not 2x nearest-exact + conv")
        self.conv = copy_conv2d(convs[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))


class Head(nn.Module):
    """norm -> act -> the output convolution (to RGB)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.norm = ChannelRMSNorm(decoder.norm_out)
        self.act = decoder.nonlinearity
        self.conv = frame_conv(decoder.conv_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.act(self.norm(x)))


def decoder_layers(vae: nn.Module) -> list[nn.Module]:
    """The single-frame decoder of `vae` as a list of layers run in order: post-quant conv, input conv, middle
    block (res, then attention + res pairs), up blocks (res blocks, then the upsampler), head."""
    dec = vae.decoder
    mid = dec.mid_block
    first, *rest = mid.resnets
    layers: list[nn.Module] = [frame_conv(vae.post_quant_conv), frame_conv(dec.conv_in), ResBlock(first)]
    for attention, res in zip(mid.attentions, rest, strict=True):
        layers += [FrameAttention(attention), ResBlock(res)]
    for block in dec.up_blocks:
        layers += [ResBlock(res) for res in block.resnets]
        layers += [Upsample(up) for up in block.upsamplers or ()]
    layers.append(Head(dec))
    return layers


class FrameDecoder(nn.Module):
    """`AutoencoderKLQwenImage`'s decoder for one frame: (B, z_dim, h, w) latents (un-normalised, as diffusers'
    `decode` takes them) -> (B, 3, 8h, 8w) images clamped to [-1, 1]. Built from the VAE in its device and dtype.

    `channels_last`: keep activations NHWC; `cudnn_benchmark`: time cuDNN's algorithms per convolution shape."""

    def __init__(self, vae: nn.Module, *, channels_last: bool = False, cudnn_benchmark: bool = False):
        super().__init__()
        self.channels_last, self.cudnn_benchmark = channels_last, cudnn_benchmark
        weight = vae.post_quant_conv.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.layers = nn.Sequential(*decoder_layers(vae)).to(self.device, self.dtype)
        if channels_last:
            self.layers.to(memory_format=torch.channels_last)
        self.layers.eval().requires_grad_(False)
        self.compiled = False

    def compile_layers(self, backend=None) -> FrameDecoder:
        """torch.compile the decoder as one full graph (`backend`: fastdit's inductor backend unless given); the
        first decode at a size compiles, a second size recompiles once with dynamic sizes."""
        if not self.compiled:
            self.layers.compile(fullgraph=True, backend=backend or inductor_backend())
            self.compiled = True
        return self

    def forward(self, z: Tensor) -> Tensor:
        z = z.to(self.device, self.dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with cudnn_autotune(self.cudnn_benchmark and self.device.type == "cuda"):
            return self.layers(z).clamp(-1.0, 1.0)


_lock = threading.Lock()
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE -> its FrameDecoder, or None: unsupported
_compiled: weakref.WeakSet = weakref.WeakSet()  # VAEs whose decoder compile_decoder asked to compile


def _supported(vae: nn.Module) -> bool:
    from diffusers import AutoencoderKLQwenImage

    if type(vae) is not AutoencoderKLQwenImage or getattr(vae, "use_tiling", False):
        return False
    return not any(p.is_meta for p in vae.decoder.parameters())


def frame_decoder(vae: nn.Module) -> FrameDecoder | None:
    """The VAE's FrameDecoder (built on first use: channels-last and cuDNN autotuning on CUDA), or None where it does
    not apply (another VAE class, tiling enabled, weights not in memory)."""
    if not _supported(vae):
        return None
    weight = vae.post_quant_conv.weight
    with _lock:
        decoder = _decoders.get(vae, False)
        if decoder is False or (
            decoder is not None and (decoder.device, decoder.dtype) != (weight.device, weight.dtype)
        ):
            cuda = weight.device.type == "cuda"
            try:
                decoder = FrameDecoder(vae, channels_last=cuda, cudnn_benchmark=cuda)
            except UnsupportedVAE:
                decoder = None
            if decoder is not None and vae in _compiled:
                decoder.compile_layers()
            _decoders[vae] = decoder
        return decoder


def compile_decoder(vae: nn.Module) -> bool:
    """Compile the VAE's FrameDecoder (now and after any rebuild); False where the fast decode does not apply."""
    with _lock:
        _compiled.add(vae)
    decoder = frame_decoder(vae)
    if decoder is None:
        return False
    decoder.compile_layers()
    return True


def decode_frames(vae: nn.Module, z: Tensor) -> Tensor:
    """(B, z_dim, 1, h, w) un-normalised latents -> (B, channels, 8h, 8w) images in [-1, 1]: the FrameDecoder
    where it applies, diffusers' `decode` otherwise."""
    decoder = frame_decoder(vae) if z.shape[2] == 1 else None
    if decoder is None:
        return vae.decode(z, return_dict=False)[0][:, :, 0]
    frames = z[:, :, 0]
    if getattr(vae, "use_slicing", False) and frames.shape[0] > 1:  # one image at a time, as asked
        return torch.cat([decoder(one) for one in frames.split(1)])
    return decoder(frames)

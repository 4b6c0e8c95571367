"""fastdit.lora.formats against diffusers' own Qwen-Image LoRA conversion, on tiny random LoRAs in every layout.

The factors are small random integers and every alpha / rank is a power of two times a small integer, so
`alpha / rank * up @ down` is exact in float32 whichever way it is grouped: fastdit's delta and the one
diffusers' converted factors give (`lora_B @ lora_A`, alpha already folded in) must be equal bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastdit.errors import FastditError, LoraError
from fastdit.lora import LoraWeights, check_lora, qwen_image_lora_targets, read_lora

# A 2-block transformer of width 32: diffusers' QwenImageTransformer2DModel with 4 heads of 8,
# in_channels 16, joint_attention_dim 24, out_channels 4 and patch 2 has exactly these linears.
TINY = dict(num_layers=2, dim=32, mlp_hidden=128, in_channels=16, joint_dim=24, out_dim=16)
TARGETS = qwen_image_lora_targets(**TINY)
# alpha / rank for successive layers: exact binary fractions, so scaling commutes with the matmul.
RATIOS = (1.0, 0.25, 0.5, 1.5, 2.0, 0.75, 4.0)


def _random_lora(
    seed: int = 0, layers=None, alphas: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{layer: (down, up, alpha or None)} with integer-valued float32 factors of ranks 2..4."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, layer in enumerate(layers or TARGETS):
        out_features, in_features = TARGETS[layer]
        rank = 2 + i % 3
        down = torch.randint(-3, 4, (rank, in_features), generator=g).float()
        up = torch.randint(-3, 4, (out_features, rank), generator=g).float()
        lora[layer] = (down, up, rank * RATIOS[i % len(RATIOS)] if alphas else None)
    return lora


def _flat(layer: str) -> str:
    return layer.replace(".", "_")


# layout -> (down key, up key, alpha key) of a layer
LAYOUTS = {
    "diffusers": lambda m: (f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", None),
    # diffusers reads this one as `transformer.transformer.<layer>` (it adds its prefix to the one present), so
    # its loader would match no layer; the factors it returns are still the reference.
    "diffusers-alpha": lambda m: (
        f"transformer.{m}.lora_A.weight",
        f"transformer.{m}.lora_B.weight",
        f"transformer.{m}.alpha",
    ),
    "peft-alpha": lambda m: (f"{m}.lora_A.weight", f"{m}.lora_B.weight", f"{m}.alpha"),
    "lightning": lambda m: (f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"),
    "kohya": lambda m: (
        f"lora_unet_{_flat(m)}.lora_down.weight",
        f"lora_unet_{_flat(m)}.lora_up.weight",
        f"lora_unet_{_flat(m)}.alpha",
    ),
    "comfyui": lambda m: (
        f"diffusion_model.{m}.lora_A.weight",
        f"diffusion_model.{m}.lora_B.weight",
        f"diffusion_model.{m}.alpha",
    ),
    "musubi-comfyui": lambda m: (
        f"diffusion_model.{m}.lora_down.weight",
        f"diffusion_model.{m}.lora_up.weight",
        f"diffusion_model.{m}.alpha",
    ),
    "diffsynth": lambda m: (f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight", None),
}


def _state_dict(lora, layout: str) -> dict[str, torch.Tensor]:
    sd = {}
    for layer, (down, up, alpha) in lora.items():
        down_key, up_key, alpha_key = LAYOUTS[layout](layer)
        sd[down_key], sd[up_key] = down, up
        if alpha_key is not None and alpha is not None:
            sd[alpha_key] = torch.tensor(alpha)
    return sd


def _diffusers_deltas(path) -> dict[str, torch.Tensor]:
    """diffusers' reading of the file: its PEFT factors per layer, multiplied out (alpha already folded in)."""
    from diffusers import QwenImagePipeline

    sd = QwenImagePipeline.lora_state_dict(str(path))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        # diffusers keeps a `transformer.` prefix it finds and then adds its own when it converts.
        while key.startswith("transformer."):
            key = key.removeprefix("transformer.")
        layer, kind = key.removesuffix(".weight").rsplit(".", 1)
        assert kind in ("lora_A", "lora_B"), key
        factors.setdefault(layer, {})[kind] = value
    return {layer: f["lora_B"].float() @ f["lora_A"].float() for layer, f in factors.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_matches_diffusers(tmp_path, layout):
    """Each layout, with every LoRA-able linear of a 2-block model, reads to the same layers and the same
    `alpha / rank * up @ down` as diffusers' QwenImagePipeline.lora_state_dict, bit for bit."""
    lora = _random_lora(seed=1, alphas=LAYOUTS[layout]("x")[2] is not None)
    path = tmp_path / f"{layout}.safetensors"
    save_file(_state_dict(lora, layout), str(path))

    ours = read_lora(path)
    check_lora(ours, TARGETS, str(path))
    reference = _diffusers_deltas(path)
    assert set(ours) == set(lora) == set(reference)
    for layer, weights in ours.items():
        assert torch.equal(weights.delta(), reference[layer]), layer


def test_strength_scales_the_delta():
    """delta(scale) is scale * alpha / rank * up @ down; a missing alpha means alpha = rank."""
    lora = _random_lora(seed=2, layers=["transformer_blocks.0.attn.to_q", "img_in"], alphas=False)
    ours = read_lora(_state_dict(lora, "diffusers"))
    for layer, (down, up, _) in lora.items():
        assert ours[layer].alpha == down.shape[0]
        assert torch.equal(ours[layer].delta(0.5), 0.5 * (up @ down))


def test_non_binary_alpha_matches_diffusers(tmp_path):
    """alpha / rank = 1/3 is not exact in binary; fastdit and diffusers then agree to float32 rounding."""
    down = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    up = torch.randn(32, 3, generator=torch.Generator().manual_seed(4))
    path = tmp_path / "third.safetensors"
    m = "transformer_blocks.1.attn.to_k"
    save_file({f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up, f"{m}.alpha": torch.tensor(1.0)}, str(path))
    ours = read_lora(path)
    assert ours[m].alpha == 1.0 and ours[m].rank == 3
    torch.testing.assert_close(ours[m].delta(), _diffusers_deltas(path)[m], rtol=1e-6, atol=1e-6)


def test_diffusers_adapter_metadata_gives_alpha(tmp_path):
    """A LoRA saved by diffusers' save_lora_weights keeps lora_alpha and alpha_pattern in the safetensors header
    (no .alpha keys); fastdit applies them as PEFT does: a pattern matches the name or a dotted suffix of it."""
    from diffusers import QwenImagePipeline

    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_k"]
    lora = _random_lora(seed=5, layers=layers, alphas=False)
    sd = {k.removeprefix("transformer."): v for k, v in _state_dict(lora, "diffusers").items()}
    metadata = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"^transformer_blocks.1.attn.to_q": 2, "to_k": 1}}
    QwenImagePipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=sd, transformer_lora_adapter_metadata=metadata
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"

    _, saved = QwenImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    assert saved["transformer.lora_alpha"] == 8
    ours = read_lora(path)
    assert [ours[m].alpha for m in layers] == [8.0, 2.0, 1.0]


def test_kohya_names_resolve_to_every_layer():
    """Flattened kohya names map back to the one diffusers name each (underscores inside names such as
    to_add_out, add_q_proj and timestep_embedder included), also under SimpleTuner's lycoris_ prefix."""
    lora = _random_lora(seed=6)
    kohya = read_lora(_state_dict(lora, "kohya"))
    lycoris = read_lora({k.replace("lora_unet_", "lycoris_", 1): v for k, v in _state_dict(lora, "kohya").items()})
    assert list(kohya) == list(lycoris) == list(TARGETS)
    assert all(torch.equal(kohya[m].delta(), lycoris[m].delta()) for m in TARGETS)


def test_targets_are_the_linears_of_diffusers_model():
    """qwen_image_lora_targets lists exactly the nn.Linear layers of diffusers' QwenImageTransformer2DModel,
    with their (out_features, in_features)."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=24,
        axes_dims_rope=(2, 2, 4),
    )
    linears = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == TARGETS


# ---- bad input: one LoraError naming the file and the layer (diffusers' naming) or key


def _write(tmp_path, sd, name="my.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def _error(*args, **kwargs) -> str:
    with pytest.raises(LoraError) as e:
        read_lora(*args, **kwargs)
    assert isinstance(e.value, FastditError)
    return str(e.value)


def test_shape_mismatch_names_file_layer_and_shapes():
    """check_lora refuses factors that do not fit the layer, saying which factor and what it needs."""
    m = "transformer_blocks.1.attn.to_q"
    wide_up = {m: LoraWeights(down=torch.zeros(16, 32), up=torch.zeros(3072, 16), alpha=16.0)}
    with pytest.raises(
        LoraError,
        match=rf"^my.safetensors: {m}: lora_up is \(3072, 16\) but the layer is \(32, 32\) -> needs \(32, r\)$",
    ):
        check_lora(wide_up, TARGETS, "my.safetensors")
    m = "transformer_blocks.0.img_mlp.net.2"
    wrong_in = {m: LoraWeights(down=torch.zeros(4, 32), up=torch.zeros(32, 4), alpha=4.0)}
    with pytest.raises(
        LoraError,
        match=rf"^my.safetensors: {m}: lora_down is \(4, 32\) but the layer is \(32, 128\) -> needs \(r, 128\)$",
    ):
        check_lora(wrong_in, TARGETS, "my.safetensors")


def test_layer_beyond_the_model_depth():
    """A block index the model does not have is named, with the model's depth."""
    loras = read_lora(_state_dict(_random_lora(layers=["transformer_blocks.0.attn.to_q"]), "diffusers"))
    deeper = {"transformer_blocks.59.attn.to_q": loras["transformer_blocks.0.attn.to_q"]}
    with pytest.raises(LoraError, match=r"^x.safetensors: transformer_blocks.59.attn.to_q: no such layer .*2 blocks"):
        check_lora(deeper, TARGETS, "x.safetensors")


@pytest.mark.parametrize(
    "key",
    [
        "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight",  # a norm, not a linear
        "lora_unet_transformer_blocks_0_attn_to_qq.lora_down.weight",  # no such kohya name
        "diffusion_model.single_transformer_blocks.0.proj_mlp.lora_A.weight",  # a Flux LoRA
        "transformer_blocks.x.attn.to_q.lora_A.weight",
    ],
)
def test_key_naming_no_layer(tmp_path, key):
    """A LoRA key whose layer is not a linear of the Qwen-Image transformer is refused, naming file and key."""
    path = _write(tmp_path, {key: torch.zeros(2, 32)})
    msg = _error(path)
    assert msg.startswith(f"{path}: {key} names no linear layer of the Qwen-Image transformer")


def test_not_a_lora(tmp_path):
    """Files that are not LoRAs: a model checkpoint, garbage bytes, a pickle, a folder, a missing path, {}."""
    checkpoint = _write(tmp_path, {"img_in.weight": torch.zeros(32, 16)}, "model.safetensors")
    assert _error(checkpoint).startswith(f"{checkpoint}: not a LoRA: no key ends in .lora_A")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07not safetensors at all")
    assert _error(garbage).startswith(f"{garbage}: not a readable safetensors file")
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"")
    assert "pickle checkpoints are not read" in _error(pickle)
    assert _error(tmp_path).endswith("is a folder; pass the LoRA's .safetensors file")
    assert _error(tmp_path / "missing.safetensors").endswith("missing.safetensors: no such file")
    assert _error({}, name_for_errors="upload") == "upload: holds no tensors, so it is not a LoRA"


def test_rank_mismatch_and_missing_factor(tmp_path):
    """down and up of different ranks, or only one of the two, are refused naming the layer."""
    m = "transformer_blocks.0.img_mod.1"
    path = _write(tmp_path, {f"{m}.lora_down.weight": torch.zeros(8, 32), f"{m}.lora_up.weight": torch.zeros(192, 4)})
    assert _error(path) == (
        f"{path}: {m}: lora_down is (8, 32) (rank 8) but lora_up is (192, 4) (rank 4); "
        "both factors must have the same rank"
    )
    path = _write(tmp_path, {f"diffusion_model.{m}.lora_A.weight": torch.zeros(8, 32)}, "half.safetensors")
    assert _error(path) == f"{path}: {m}: has diffusion_model.{m}.lora_A.weight but no lora_up weight"


@pytest.mark.parametrize(
    "key",
    [
        "lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # kohya text encoder
        "text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight",  # diffusers / PEFT text encoder
    ],
)
def test_text_encoder_keys_are_refused(key):
    """Text-encoder LoRA keys are reported as unsupported rather than dropped."""
    sd = _state_dict(_random_lora(layers=["img_in"]), "kohya") | {key: torch.zeros(2, 16)}
    assert _error(sd, name_for_errors="te.safetensors") == (
        f"te.safetensors: {key}: text-encoder LoRAs are not supported (fastdit applies LoRAs to the transformer only)"
    )


@pytest.mark.parametrize(
    "suffix, label",
    [(".lokr_w1", "LoKr"), (".dora_scale", "DoRA"), (".diff_b", "full weight/bias difference"), (".hada_w1_a", "LoHa")],
)
def test_other_adapter_types_are_named(suffix, label):
    """LoKr, DoRA, LoHa and full-difference weights are refused by name, not as unknown keys."""
    key = f"lora_unet_transformer_blocks_0_attn_to_q{suffix}"
    sd = _state_dict(_random_lora(layers=["img_in"]), "kohya") | {key: torch.zeros(4, 4)}
    assert (
        _error(sd, name_for_errors="a.safetensors")
        == f"a.safetensors: {key}: {label} weights are not supported, only plain LoRA"
    )


def test_layer_given_twice_and_several_adapters():
    """Two keys for the same factor of a layer, or two PEFT adapter names in one file, are refused."""
    m = "transformer_blocks.0.attn.to_v"
    sd = _state_dict(_random_lora(layers=[m]), "comfyui")
    twice = sd | {f"{m}.lora_down.weight": sd[f"diffusion_model.{m}.lora_A.weight"]}
    assert _error(twice, name_for_errors="d.safetensors") == (
        f"d.safetensors: {m}: given twice, by diffusion_model.{m}.lora_A.weight and {m}.lora_down.weight"
    )
    sd = _state_dict(_random_lora(layers=[m, "img_in"], alphas=False), "diffsynth")
    sd = {k.replace("img_in.lora_A.default", "img_in.lora_A.other"): v for k, v in sd.items()}
    assert "holds several adapters (default, other)" in _error(sd)

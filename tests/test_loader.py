"""Every bad checkpoint raises one CheckpointError (a ValueError) whose message names the file or key."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdit import CheckpointError, FastditError, load_transformer
from fastdit.models.qwenimage import PRESETS, QwenImageTransformer
from fastdit.models.qwenimage_keys import checkpoint_keys
from tests.dit_utils import save_tiny

SINGLE = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def good_single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    save_tiny(path)
    return path


@pytest.fixture(scope="module")
def good_sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    save_tiny(path, sharded=True)
    return path


@pytest.fixture
def single(good_single, tmp_path):
    return shutil.copytree(good_single, tmp_path / "ckpt")


@pytest.fixture
def sharded(good_sharded, tmp_path):
    return shutil.copytree(good_sharded, tmp_path / "ckpt")


def expect_error(path, *needles):
    with pytest.raises(CheckpointError) as exc:
        load_transformer(path, dtype=torch.float32, device="cpu")
    msg = str(exc.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in message: {msg}"
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, FastditError)
    return msg


def test_loads_a_pipeline_root_holding_transformer(good_single, tmp_path):
    shutil.copytree(good_single, tmp_path / "transformer")
    model = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert model.cfg.num_layers == 2


def test_every_parameter_maps_to_checkpoint_keys_that_exist(good_single):
    keys = set(load_file(good_single / SINGLE))
    with torch.device("meta"):
        model = QwenImageTransformer(PRESETS["tiny"])
    used = [k for name, _ in model.named_parameters() for k in checkpoint_keys(name)]
    assert len(used) == len(set(used)) == len(keys)
    assert set(used) == keys


def test_missing_folder(tmp_path):
    expect_error(tmp_path / "nope", "nope", "does not exist")


def test_missing_config(single):
    (single / "config.json").unlink()
    expect_error(single, "config.json", str(single))


def test_config_that_does_not_fit(single):
    cfg = json.loads((single / "config.json").read_text())
    cfg["axes_dims_rope"] = [8, 12, 14]  # sums to 34, head_dim is 32
    (single / "config.json").write_text(json.dumps(cfg))
    expect_error(single, "config.json", "axes_dims_rope", "head_dim=32")


def test_config_heads_that_disagree_with_the_weights(single):
    cfg = json.loads((single / "config.json").read_text())
    cfg["num_attention_heads"] = 3  # 3 x 32 = 96 != 64, the width the weights have
    cfg["axes_dims_rope"] = [8, 12, 12]
    (single / "config.json").write_text(json.dumps(cfg))
    expect_error(single, "shape mismatch", "img_in.weight", SINGLE)


def test_no_weights(single):
    (single / SINGLE).unlink()
    expect_error(single, SINGLE, str(single))


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("*-of-*.safetensors"))[0]
    shard.unlink()
    expect_error(sharded, shard.name, INDEX)


def test_index_names_a_shard_that_is_not_there(sharded):
    index = json.loads((sharded / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "diffusion_pytorch_model-99999-of-99999.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    expect_error(sharded, "99999-of-99999", INDEX)


def test_missing_key(single):
    sd = load_file(single / SINGLE)
    del sd["transformer_blocks.1.attn.add_k_proj.weight"]
    save_file(sd, single / SINGLE)
    expect_error(single, "missing", "transformer_blocks.1.attn.add_k_proj.weight")


def test_unexpected_key(single):
    sd = load_file(single / SINGLE)
    sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(3)
    save_file(sd, single / SINGLE)
    expect_error(single, "unexpected", "transformer_blocks.0.attn.extra.weight", SINGLE)


def test_shape_mismatch(single):
    sd = load_file(single / SINGLE)
    sd["transformer_blocks.0.img_mlp.net.2.weight"] = torch.zeros(64, 100)
    save_file(sd, single / SINGLE)
    expect_error(single, "shape mismatch", "transformer_blocks.0.img_mlp.net.2.weight", SINGLE)


def test_truncated_safetensors(single):
    data = (single / SINGLE).read_bytes()
    (single / SINGLE).write_bytes(data[: len(data) // 2])
    expect_error(single, SINGLE, "truncated")


def test_corrupt_safetensors_header(single):
    data = bytearray((single / SINGLE).read_bytes())
    data[8:40] = b"#" * 32  # garble the JSON header
    (single / SINGLE).write_bytes(bytes(data))
    expect_error(single, SINGLE, "corrupt")


def test_corrupt_shard_in_an_index(sharded):
    shard = sorted(sharded.glob("*-of-*.safetensors"))[-1]
    shard.write_bytes(b"\x00" * 5)
    expect_error(sharded, shard.name)


def test_bad_index_json(sharded):
    (sharded / INDEX).write_text("{not json")
    expect_error(sharded, INDEX)

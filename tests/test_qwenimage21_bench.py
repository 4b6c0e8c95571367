"""`fastdit bench --family qwen-image-2.1` runs end to end on the CPU with the tiny preset: the prefix prefill and the
cached step, compiled, against diffusers' model on the same weights, and on two ranks (the GPU numbers come from the
same code)."""

import json

import pytest

from fastdit.bench.dit21 import cache_gib, weights_gib
from fastdit.cli.main import main
from fastdit.models.qwenimage21 import PRESETS

ARGS = ["bench", "--family", "qwen-image-2.1", "--preset", "tiny", "--device", "cpu", "--warmup", "0", "--iters", "1"]


def test_full_size_memory():
    """The released 2.1 DiT (32 blocks x 4096 wide): about 7.1 B parameters, 14.2 GB (13.3 GiB) in bf16; the prefix
    K/V of a 1024^2 condition image plus 128 text tokens (4224 tokens) is 2.2 GB (2.06 GiB) per row."""
    assert weights_gib(PRESETS["qwen-image-2.1"]) == pytest.approx(13.25, abs=0.05)
    assert cache_gib(PRESETS["qwen-image-2.1"], 1, 4224) == pytest.approx(2.06, abs=0.05)


def test_prefill_and_step_compiled_against_diffusers(tmp_path, capsys):
    """A condition image in the prefix and a shorter (padded) negative prompt: fastdit's cached step equals
    diffusers' on the same weights (fp32), and the prefill of both is reported."""
    out = tmp_path / "b.json"
    argv = [*ARGS, "--dtype", "fp32", "--height", "64", "--width", "96", "--text-len", "7", "--condition-images", "1"]
    argv += ["--uncond-text-len", "4", "--compile", "--compare", "diffusers-eager", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"fastdit eager", "fastdit compiled (regional)", "diffusers eager"}
    assert set(res["prefill"]) == {"fastdit", "diffusers (first step: prefix + noise)"}
    # The prefix: 7 text tokens and the condition image's 24 latent tokens in its 6 slots.
    assert res["shapes"]["image_tokens"] == 24 and res["shapes"]["prefix_tokens"] == 7 + 24
    assert res["rel_l2_vs_diffusers"] < 1e-5
    assert "prefill fastdit" in capsys.readouterr().out


def test_on_two_sequence_parallel_ranks(tmp_path):
    """--sp 2: the prefill and the step on two gloo ranks (Ulysses), reported by rank 0."""
    out = tmp_path / "sp.json"
    argv = [*ARGS, "--dtype", "bf16", "--height", "64", "--width", "64", "--text-len", "8", "--condition-images", "1"]
    assert main([*argv, "--sp", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ranks"] == {"tp": 1, "sp": 2, "cfg": 1} and set(res["prefill"]) == {"fastdit"}

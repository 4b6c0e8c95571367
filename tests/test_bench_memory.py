"""`fastdit bench --stage memory` (memory plans, diffusers' offloading) and `--stage quant` (recipes, int4 GEMMs)
run end to end on the CPU with the tiny preset; the GPU numbers come from the same code at full size."""

from __future__ import annotations

import json

import pytest

from fastdit.bench.memory import split_times
from fastdit.cli.main import main

TINY = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--height", "64", "--width", "64"]


def test_split_times_extrapolates_steps_only():
    """Steps of 1 s after 2 s of text and a 0.5 s table, then 3 s of VAE: 50 steps are 2 + 0.5 + 50 + 3 s."""
    t0 = 100.0
    stamps = [t0 + 2 + 0.5 + 1, t0 + 2 + 0.5 + 2, t0 + 2 + 0.5 + 3]
    r = split_times(t0, stamps, total=8.5, first_part=2.0, last_part=3.0)
    assert r["step_s"] == pytest.approx(1.0) and r["modulation_table_s"] == pytest.approx(0.5)
    assert r["image_50_s"] == pytest.approx(55.5) and r["image_s"] == 8.5


def test_pipeline_stage_on_cpu(tmp_path, capsys):
    """One whole image per recipe under offload-blocks with one of the tiny DiT's two blocks streamed, and diffusers'
    group offloading on the same components: every run records its stage times and 50-step extrapolation, the
    streamed block's copies, and the table prints."""
    out = tmp_path / "pipeline.json"
    argv = ["bench", "--stage", "memory", *TINY, "--steps", "2", "--warmup-steps", "1", "--memory", "offload-blocks"]
    argv += ["--recipes", "bf16,int4", "--resident-blocks", "1", "--reference", "group", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    runs = res["runs"]
    assert set(runs) == {
        "fastdit bf16 offload-blocks @ uncapped",
        "fastdit int4 offload-blocks @ uncapped",
        "diffusers bf16 group-offload @ uncapped",
    }
    for name, r in runs.items():
        assert r["step_s"] > 0 and r["image_50_s"] > r["image_s"] > 0, (name, r)
        if name.startswith("fastdit"):
            assert r["resident_blocks"] == 1 and r["block_copies_per_step"] == 1, r
            assert "1 of 2 DiT blocks on the device" in r["plan"]
    assert res["bandwidth"] is None and res["environment"]["torch"]
    table = capsys.readouterr().out
    assert "fastdit int4 offload-blocks @ uncapped" in table and "@50 s" in table


def test_quant_stage_on_cpu(tmp_path, capsys):
    """The recipes on the tiny DiT (fp8 emulated on the CPU) with their error against the unquantized step, and the
    int4 GEMM at each block-linear shape (the torch path here: equal to the dequantized product)."""
    out = tmp_path / "quant.json"
    argv = ["bench", "--stage", "quant", *TINY, "--text-len", "8", "--warmup", "0", "--iters", "1"]
    assert main([*argv, "--recipes", "bf16,fp8,fp8-fast,int4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    runs = res["runs"]
    assert set(runs) == {"bf16 eager", "fp8 eager", "fp8-fast eager", "int4 eager"}
    assert runs["bf16 eager"]["cosine_vs_bf16"] == pytest.approx(1.0)
    for name in ("fp8 eager", "fp8-fast eager", "int4 eager"):
        assert 0.99 < runs[name]["cosine_vs_bf16"] < 1.0 and runs[name]["rel_l2_vs_bf16"] > 0, runs[name]
    assert runs["int4 eager"]["weights_gib"] < runs["bf16 eager"]["weights_gib"]
    assert len(res["gemms"]) == 8
    assert all(r.get("rel_l2_vs_dequantized", 0) < 1e-5 for r in res["gemms"].values())
    assert "int4 GEMM" in capsys.readouterr().out


def test_memory_stages_refuse_bad_flags(capsys):
    """Bad sizes and unknown recipes are one-line errors (exit 2)."""
    assert main(["bench", "--stage", "memory", *TINY[:6], "--height", "100"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["bench", "--stage", "quant", "--recipes", "int3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "multiples of 16" in err and "int3" in err and "Traceback" not in err

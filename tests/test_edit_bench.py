"""`fastdit bench --task edit` runs end to end on the CPU with the tiny preset (the GPU numbers come from the same code)."""

import json

from fastdit.cli.main import main


def test_bench_edit_two_references_compiled_against_diffusers(tmp_path, capsys):
    """The Edit-2511 step with two references and a padded negative prompt: fastdit eager and compiled against
    diffusers' zero_cond_t model on the same weights; the compiled blocks serve a second reference size and text
    length without a new graph."""
    out = tmp_path / "edit.json"
    argv = ["bench", "--task", "edit", "--refs", "2", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32"]
    argv += ["--height", "64", "--width", "48", "--text-len", "9", "--uncond-text-len", "5", "--warmup", "1"]
    argv += ["--iters", "2", "--compile", "--compare", "diffusers-eager", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"fastdit eager", "fastdit compiled (regional)", "diffusers eager"}
    shapes = res["shapes"]
    assert shapes["image_tokens"] == 3 * 12 and shapes["reference_images"] == 2 and shapes["zero_cond_t"]
    assert res["rel_l2_vs_diffusers"] < 1e-5  # same weights, fp32
    second = res["warmup"]["fastdit compiled (regional)"]
    assert second["graphs"] == 0 and shapes["second_shape"] == {"image_tokens": 12 + 2 * 9, "text_tokens": 8}
    assert "0 new graph(s) at a second" in capsys.readouterr().out


def test_bench_edit_refuses_what_it_does_not_time(capsys):
    base = ["bench", "--preset", "tiny", "--device", "cpu"]
    assert main([*base, "--task", "edit", "--tp", "2"]) == 2
    assert main([*base, "--task", "edit", "--stage", "vae"]) == 2
    assert main([*base, "--task", "edit", "--refs", "0"]) == 2
    assert main([*base, "--refs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("--task edit times one CFG step") == 2
    assert "--refs must be >= 1" in err and "--refs needs --task edit" in err and "Traceback" not in err

"""`fastdit generate`: an end-to-end run writes a real image; bad input exits 2, one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from fastdit.cli.main import build_parser, main


def _run(args, cache, **kw):
    env = dict(os.environ, FASTDIT_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "fastdit", *args], capture_output=True, text=True, env=env, timeout=300, **kw
    )


def test_generate_end_to_end(tiny_cache, tmp_path):
    """`python -m fastdit generate --model tiny-random` writes a PNG of the asked size and stage timings."""
    out, timings = tmp_path / "cat.png", tmp_path / "t.json"
    proc = _run(
        [
            "generate",
            "--model",
            "tiny-random",
            "--prompt",
            "a cat",
            "--negative-prompt",
            " ",
            "--height",
            "48",
        ]
        + [
            "--width",
            "80",
            "--steps",
            "2",
            "--seed",
            "3",
            "--output",
            str(out),
            "--timings-json",
            str(timings),
        ],
        tiny_cache,
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (80, 48)
    assert "draws noise" in proc.stderr
    assert "denoising" in proc.stderr  # the progress bar
    for stage in ("text encoding", "denoising", "VAE decode", "s/step"):
        assert stage in proc.stdout
    record = json.loads(timings.read_text())
    assert record["seeds"] == [3] and record["steps"] == 2
    assert {"load_s", "text_encode_s", "denoise_s_per_step", "vae_decode_s"} <= record.keys()


def test_several_images_into_a_folder(tiny_dir, tiny_pipe, tmp_path):
    """In process: two images into a folder with seeds 5 and 6; image 1 equals a one-image run with seed 6."""
    folder = tmp_path / "out"
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "a kite", "--height", "32", "--width", "32"]
    assert main([*argv, "--steps", "2", "--seed", "5", "--num-images", "2", "--output", f"{folder}/"]) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["fastdit-0-seed5.png", "fastdit-1-seed6.png"]
    alone = tiny_pipe("a kite", height=32, width=32, num_inference_steps=2, seed=6, show_progress=False)[0]
    with Image.open(folder / names[1]) as saved:
        assert saved.tobytes() == alone.tobytes()


def test_attention_sdpa_equals_auto_on_cpu(tiny_dir, tmp_path):
    """`--attention sdpa` runs end to end and, on CPU, draws exactly the default (auto resolves to sdpa)."""
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "a kite", "--height", "32", "--width", "32"]
    argv += ["--steps", "2", "--seed", "4", "--device", "cpu"]
    auto, sdpa = tmp_path / "auto.png", tmp_path / "sdpa.png"
    assert main([*argv, "--output", str(auto)]) == 0
    assert main([*argv, "--attention", "sdpa", "--output", str(sdpa)]) == 0
    with Image.open(auto) as a, Image.open(sdpa) as b:
        assert b.size == (32, 32) and a.tobytes() == b.tobytes()


def test_cuda_graph_on_cpu_is_one_line(tiny_dir, tmp_path, capsys):
    """--cuda-graph needs CUDA: exit 2 and one stderr line, before loading; also with ranks (gloo)."""
    out = tmp_path / "x.png"
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--cuda-graph", "--steps", "1", "--output", str(out)]
    for extra in (["--device", "cpu"], ["--device", "cpu", "--cfg-parallel"], ["--device", "not-a-device"]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastdit: error:") and "Traceback" not in err[0], err
        assert "--cuda-graph needs a CUDA device" in err[0] or "not-a-device" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("backend, says", [("int8", "8-bit attention"), ("fp8", "fp8 attention")])
def test_8bit_attention_on_cpu_is_one_line(tiny_dir, tmp_path, capsys, backend, says):
    """The 8-bit kernels need CUDA: exit 2, one stderr line saying so, no image."""
    out = tmp_path / "x.png"
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--attention", backend, "--device", "cpu"]
    assert main([*argv, "--steps", "1", "--height", "32", "--width", "32", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"fastdit: error: {says}") and "CUDA" in err[0] and "cpu" in err[0], err
    assert not out.exists()


def _bad_cases(tmp_path, tiny_dir):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text("{}")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return {
        "height-not-16": ["--height", "100"],
        "width-zero": ["--width", "0"],
        "height-negative": ["--height", "-16"],
        "height-not-int": ["--height", "abc"],
        "steps-zero": ["--steps", "0"],
        "cfg-below-1": ["--cfg-scale", "0.5"],
        "cfg-nan": ["--cfg-scale", "nan"],
        "empty-prompt": ["--prompt", ""],
        "blank-prompt": ["--prompt", "   "],
        "missing-model": ["--model", str(tmp_path / "nope")],
        "model-is-file": ["--model", str(a_file)],
        "incomplete-model": ["--model", str(incomplete)],
        "output-dir-missing": ["--output", str(tmp_path / "no" / "such" / "x.png")],
        "output-under-a-file": ["--output", str(a_file / "x.png")],
        "output-bad-suffix": ["--output", str(tmp_path / "x.txt")],
        "timings-unwritable": ["--timings-json", str(a_file / "t.json")],
        "prompt-too-long": ["--model", str(tiny_dir), "--prompt", "word " * 600],
        "bad-dtype": ["--dtype", "int8"],
        "bad-device": ["--device", "nonsense"],
    }


BAD = [
    "height-not-16",
    "width-zero",
    "height-negative",
    "height-not-int",
    "steps-zero",
    "cfg-below-1",
    "cfg-nan",
    "empty-prompt",
    "blank-prompt",
    "missing-model",
    "model-is-file",
    "incomplete-model",
    "output-dir-missing",
    "output-under-a-file",
    "output-bad-suffix",
    "timings-unwritable",
    "prompt-too-long",
    "bad-dtype",
    "bad-device",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(case, tiny_dir, tmp_path, capsys):
    extra = _bad_cases(tmp_path, tiny_dir)[case]
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--height", "32", "--width", "32"]
    argv += ["--steps", "1", "--output", str(tmp_path / "ok.png"), *extra]
    with pytest.raises(SystemExit) as exc:  # argparse errors exit directly
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("fastdit: warning:")]
    assert len(err) == 1, err
    assert "error:" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "ok.png").exists()


def test_hub_download_failure_is_one_line(monkeypatch, tmp_path, capsys):
    """A repo id that cannot be fetched says so in one line (the download itself is faked)."""
    import huggingface_hub

    def offline(repo_id, **kw):
        raise ConnectionError(f"cannot reach the Hub for {repo_id}\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    argv = [
        "generate",
        "--model",
        "someone/no-such-model",
        "--prompt",
        "a cat",
        "--output",
        str(tmp_path / "x.png"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastdit: error: --model someone/no-such-model: could not download")

    # `fastdit serve` takes the same model names (one resolver): the same one line, no traceback.
    assert main(["serve", "--model", "someone/no-such-model", "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "fetching it from the Hugging Face Hub" in err[0], err
    assert err[1].startswith("fastdit: error: --model someone/no-such-model: could not download"), err
    assert not any("Traceback" in line for line in err)


def test_bad_input_in_a_real_process(tiny_cache):
    """The installed entry point, not just main(): exit 2, one stderr line, no traceback."""
    proc = _run(["generate", "--model", "tiny-random", "--prompt", "a cat", "--steps", "0"], tiny_cache)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fastdit: error: --steps must be an integer between 1 and 1000, got 0"


def test_help_says_long_prompts_are_refused():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    assert "refused, not truncated" in text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


def test_cuda_graph_hint_for_tp_and_sp_on_cuda(monkeypatch, capsys):
    """tp / sp on CUDA without --cuda-graph get a one-line note (their steps are host-bound without it)."""
    from fastdit.cli import common
    from fastdit.cli.common import ModelOptions, check_model_options

    monkeypatch.setattr(common, "on_cuda", lambda device: device != "cpu")
    cuda = ModelOptions(device="cuda")
    for options, tp, sp, says in [
        (cuda, 1, 2, True),
        (cuda, 2, 1, True),
        (ModelOptions(device="cuda", cuda_graph=True), 1, 2, False),
        (cuda, 1, 1, False),  # CFG parallel alone: no collective per block
        (ModelOptions(device="cpu"), 2, 2, False),
    ]:
        check_model_options(options, tp, sp)
        assert ("--cuda-graph" in capsys.readouterr().err) == says, (options, tp, sp)


def test_notes_come_from_rank_0_alone(monkeypatch, capsys):
    """Under torchrun every rank runs the same checks; a note (tiny-random, a Hub fetch, the --cuda-graph hint) is
    printed by rank 0 only."""
    from fastdit.cli.common import note

    monkeypatch.setenv("RANK", "1")
    note("from rank 1")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    note("from rank 0")
    assert capsys.readouterr().err == "fastdit: from rank 0\n"

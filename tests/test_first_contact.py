"""What a new user meets first: `fastdit bench` without a GPU, --model names that are paths vs Hub repo ids, the
output checked before any loading, fp8 folders on a CPU, the CFG default, and --help texts. Each bad input is
exit 2 with one line, before anything heavy runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastdit.cli.common import resolve_model
from fastdit.cli.main import build_parser, main
from fastdit.errors import FastditError


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("fastdit: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_bench_without_cuda_needs_cpu_and_the_tiny_preset(monkeypatch, capsys):
    """No CUDA: `fastdit bench` alone and `--device cpu` with the full-size preset each exit 2 with one line
    saying to use --device cpu --preset tiny, before building any model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench"]) == 2
    assert "--device cpu --preset tiny" in _error_line(capsys)
    assert main(["bench", "--device", "cpu"]) == 2
    assert "--preset tiny" in _error_line(capsys)
    assert main(["bench", "--device", "cuda", "--preset", "tiny"]) == 2
    assert "no CUDA GPU is visible" in _error_line(capsys)


@pytest.mark.parametrize("model", ["./models/qwen-image", "~/no-such-fastdit-folder", "a/b/c", "models/qwen-image"])
def test_path_like_model_names_never_go_to_the_hub(model, tmp_path, monkeypatch):
    """A name with a leading . or ~, more than one separator, or an existing first part (here `models/`) is a
    local path: "no such folder", and nothing is downloaded."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("sent to the Hub"))
    with pytest.raises(FastditError, match="no such folder"):
        resolve_model(model)


def test_owner_name_goes_to_the_hub_and_says_so(tmp_path, monkeypatch, capsys):
    """An `owner/name` that is no local path is fetched as a Hub repo id, with a note saying so."""
    import huggingface_hub

    fetched = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: fetched.append(repo) or str(tmp_path))
    assert resolve_model("Qwen/Qwen-Image") == tmp_path and fetched == ["Qwen/Qwen-Image"]
    assert "fetching it from the Hugging Face Hub as a repo id" in capsys.readouterr().err


@pytest.mark.parametrize(
    "output, says",
    [("/proc/out.png", "not writable"), ("{tmp}/no/such/dir/x.png", "does not exist"), ("{tmp}/x.txt", "suffix")],
)
def test_output_is_checked_before_the_model_loads(output, says, tiny_dir, tmp_path, monkeypatch, capsys):
    """An output that cannot be written (a /proc path, a missing folder, an unknown suffix) is exit 2 with one
    line, and the pipeline is never loaded."""
    import fastdit.pipelines

    monkeypatch.setattr(fastdit.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--output", output.format(tmp=tmp_path)]
    assert main(argv) == 2
    assert says in _error_line(capsys)


def test_ranks_checking_one_output_at_once_all_pass_and_leave_nothing(tmp_path):
    """Under torchrun every rank checks the same --output at the same moment: none fails on another's probe
    file, a new folder is made once, nothing is left behind, and an existing image is kept as it was."""
    import threading

    from fastdit.cli.common import output_paths

    existing = tmp_path / "kept.png"
    existing.write_bytes(b"old")
    targets = [(str(tmp_path / "new.png"), 1), (str(tmp_path / "made") + "/", 2), (str(existing), 1)]
    barrier, errors = threading.Barrier(8), []

    def rank() -> None:
        barrier.wait()
        for _ in range(50):
            for output, count in targets:
                try:
                    output_paths(output, count, [0, 1][:count])
                except Exception as e:  # any failure is the race this test is about
                    errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png", "made"]
    assert list((tmp_path / "made").iterdir()) == [] and existing.read_bytes() == b"old"


def test_fp8_folder_on_cpu_says_it_is_fp8(tiny_dir, tmp_path, capsys):
    """A folder written by `fastdit quantize`, generated from on a CPU without --quantize: one line saying the
    folder is fp8 and needs an fp8-capable GPU, not a word about --quantize."""
    assert main(["quantize", "--model", str(tiny_dir), "--output", str(tmp_path / "fp8")]) == 0
    capsys.readouterr()
    argv = ["generate", "--model", str(tmp_path / "fp8"), "--prompt", "x", "--height", "32", "--width", "32"]
    assert main([*argv, "--steps", "1", "--device", "cpu", "--output", str(tmp_path / "x.png")]) == 2
    line = _error_line(capsys)
    assert "holds fp8 (e4m3) weights" in line and "not on cpu" in line and "--quantize" not in line, line


def _generate(tiny_dir, out: Path, capsys, *extra: str) -> tuple[bytes, str]:
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "a kite", "--height", "32", "--width", "32"]
    assert main([*argv, "--steps", "2", "--seed", "3", "--device", "cpu", "--output", str(out), *extra]) == 0
    with Image.open(out) as image:
        return image.tobytes(), capsys.readouterr().err


def test_cfg_default_and_notes_use_the_flag_names(tiny_dir, tmp_path, capsys):
    """No CFG flag and no negative prompt: no note at all (README's first command). A negative prompt alone runs
    CFG at 4.0 (the same image as --cfg-scale 4). A scale without a negative prompt, or a negative prompt with
    --cfg-scale 1, gets one note in the CLI's own flag names."""
    _, err = _generate(tiny_dir, tmp_path / "plain.png", capsys)
    assert "cfg" not in err.lower() and "warning" not in err, err
    default_cfg, _ = _generate(tiny_dir, tmp_path / "neg.png", capsys, "--negative-prompt", " ")
    explicit, _ = _generate(tiny_dir, tmp_path / "neg4.png", capsys, "--negative-prompt", " ", "--cfg-scale", "4")
    assert default_cfg == explicit
    no_cfg, _ = _generate(tiny_dir, tmp_path / "off.png", capsys, "--negative-prompt", " ", "--cfg-scale", "1")
    assert no_cfg != default_cfg
    _, err = _generate(tiny_dir, tmp_path / "scale.png", capsys, "--cfg-scale", "5")
    notes = [line for line in err.splitlines() if "cfg" in line.lower()]
    assert notes == ["fastdit: --cfg-scale 5 has no effect without --negative-prompt: CFG is off"], err
    _, err = _generate(tiny_dir, tmp_path / "one.png", capsys, "--negative-prompt", "fog", "--cfg-scale", "1")
    notes = [line for line in err.splitlines() if "cfg" in line.lower()]
    assert notes == ["fastdit: --negative-prompt has no effect with --cfg-scale 1: CFG is off"], err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", ["generate", "edit", "serve", "bench", "quantize", "eval-cache"])
def test_help_texts(command):
    """Every option of every subcommand has a help text; none shows "(default: None)" or a default twice;
    required options show no default."""
    parser = _subcommands()[command]
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        assert text, f"{command} {action.option_strings} has no help"
        assert "(default: None)" not in text and text.count("default") <= 1, (command, action.option_strings, text)
        if action.required:
            assert "default" not in text, (command, action.option_strings, text)


def test_help_explains_flash_vs_flash_attn_and_the_cfg_default():
    """The attention choices are explained where they are offered (generate, serve, bench), and generate's help
    says when CFG runs by default."""
    for command in ("generate", "serve", "bench"):
        text = " ".join(_subcommands()[command].format_help().split())
        assert "flash: PyTorch's bundled FlashAttention-2; flash_attn: the separate flash-attn package" in text
    generate = " ".join(_subcommands()["generate"].format_help().split())
    assert "default: 4.0 with a negative prompt, off without one" in generate


def test_dtype_spellings_are_the_same_everywhere():
    """generate, serve and bench accept the same --dtype spellings (fastdit.validation.DTYPE_NAMES), default auto."""
    from fastdit.validation import DTYPE_NAMES

    for command in ("generate", "serve", "bench"):
        (action,) = [a for a in _subcommands()[command]._actions if a.dest == "dtype"]
        assert list(action.choices) == list(DTYPE_NAMES) and action.default == "auto", command

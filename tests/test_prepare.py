"""Preparing a model folder once: under torchrun every rank resolves --model at the same time; one builds (or
downloads) it while the others wait, and nobody rebuilds a folder another rank is loading. Also: a `fastdit
quantize` that fails leaves no folder behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdit.cli.main import main

REPO = Path(__file__).resolve().parents[1]

# One "rank": resolve tiny-random with a slow fake build that fails if the folder is touched by another builder.
_RANK = r"""
import json, os, sys, time
from pathlib import Path

import fastdit.tiny as tiny
from fastdit.cli.common import resolve_model

log = Path(sys.argv[1])

def slow_build(path, kind="qwen-image", seed=0):
    with open(log, "a") as f:
        f.write(json.dumps({"built_by": os.environ["RANK"]}) + "\n")
    path.mkdir(parents=True)  # fails if another rank built it already
    time.sleep(2)
    (path / "model_index.json").write_text("{}")
    return path

tiny.build_tiny_pipeline = slow_build
folder = resolve_model("tiny-random")
assert (folder / "model_index.json").is_file()
with open(log, "a") as f:
    f.write(json.dumps({"rank": os.environ["RANK"], "folder": str(folder)}) + "\n")
"""


def test_torchrun_ranks_build_the_tiny_model_once(tmp_path):
    """Three processes started as torchrun ranks (RANK / WORLD_SIZE set) resolve `tiny-random` in an empty
    cache at once: exactly one builds it, all three get the finished folder."""
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "FASTDIT_CACHE": str(tmp_path / "cache"), "WORLD_SIZE": "3", "PYTHONPATH": str(REPO)}
    ranks = [
        subprocess.Popen([sys.executable, "-c", _RANK, str(log)], env={**env, "RANK": str(r)}, cwd=REPO)
        for r in range(3)
    ]
    assert [rank.wait(180) for rank in ranks] == [0, 0, 0]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len([r for r in records if "built_by" in r]) == 1, records
    assert sorted(r["rank"] for r in records if "rank" in r) == ["0", "1", "2"]
    assert len({r["folder"] for r in records if "folder" in r}) == 1


def test_failed_quantize_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    """A `fastdit quantize` that fails while writing (here: the disk fills after the first shard) leaves neither
    the output folder nor a hidden staging folder, so the next run starts clean."""
    import fastdit.quant.checkpoint as checkpoint

    written = []

    def fail_after_one(tensors, path, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        Path(path).write_bytes(b"partial")

    monkeypatch.setattr(checkpoint, "save_file", fail_after_one)
    out = tmp_path / "out" / "fp8"
    argv = ["quantize", "--model", str(tiny_dir), "--output", str(out), "--shard-size-gb", "0.0001"]
    with pytest.raises(OSError, match="No space left"):
        main(argv)
    assert written, "the failure must come after a shard was written"
    assert not out.exists() and list(out.parent.iterdir()) == []

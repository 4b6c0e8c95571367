"""A broken pipeline folder is one line naming the file, exit 2, before anything big is allocated.

Each case copies the tiny-random folder (hard links), breaks one thing (removes a file or a component folder,
empties a config, truncates a weights file) and runs `fastdit generate` on it. All cases run in ONE subprocess
(torch and the libraries are imported once) whose address space is capped with RLIMIT_AS, so a case that made
a library build a default-size model (a 7B text encoder: tens of GB) fails with MemoryError instead of taking
the machine's memory; the subprocess also reports its peak resident memory (VmHWM).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE_LIMIT = 6 << 30  # torch reserves a few GB of address space; a default 7B model needs 30 GB
PEAK_RSS_LIMIT_MB = 2048

# Every file of the tiny-random folder (test_the_case_list_covers_the_folder keeps this in step with it).
FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
OPTIONAL = {"text_encoder/generation_config.json"}  # transformers uses defaults without it
CASES = (
    [("remove", f) for f in FILES]
    + [("remove", d) for d in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")]
    + [("empty", f) for f in ("text_encoder/config.json", "vae/config.json", "transformer/config.json")]
    + [("empty", "tokenizer/tokenizer.json")]
    + [("truncate", f) for f in FILES if f.endswith(".safetensors")]
)

RUNNER = r"""
import contextlib, io, json, os, shutil, sys
from pathlib import Path

from fastdit.cli.main import main

source, work, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
for kind, rel in cases:
    folder = work / f"{kind}-{rel.replace('/', '-')}"
    shutil.copytree(source, folder, copy_function=os.link)
    target = folder / rel
    if kind == "remove":
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    else:
        data = target.read_bytes()
        target.unlink()  # a hard link: write a new file, leave the original alone
        target.write_bytes(b"{}" if kind == "empty" else data[: len(data) // 2])
    err = io.StringIO()
    argv = ["generate", "--model", str(folder), "--prompt", "x", "--height", "32", "--width", "32", "--steps", "1"]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([*argv, "--output", str(work / "out.png")])
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    lines = [line for line in err.getvalue().splitlines() if line.startswith("fastdit:")]
    # VmHWM: this program's own peak. ru_maxrss would also count the forked copy of pytest before exec.
    status = Path("/proc/self/status").read_text().splitlines()
    peak_mb = int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) // 1024
    record = {"case": [kind, rel], "code": code, "lines": lines, "peak_mb": peak_mb}
    print(json.dumps(record), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes(tiny_dir, tmp_path_factory) -> dict[tuple[str, str], dict]:
    work = tmp_path_factory.mktemp("broken-folders")

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))

    run = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tiny_dir), str(work), json.dumps(CASES)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=cap_memory,
        timeout=600,
    )
    results = {}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[tuple(record["case"])] = record
    assert len(results) == len(CASES), run.stdout[-2000:] + run.stderr[-4000:]
    return results


def test_the_case_list_covers_the_folder(tiny_dir):
    """FILES is every file of the tiny-random folder, so a file added to the recipe gets its case."""
    assert sorted(str(p.relative_to(tiny_dir)) for p in tiny_dir.rglob("*") if p.is_file()) == FILES


@pytest.mark.parametrize("kind, rel", CASES, ids=[f"{kind}-{rel}" for kind, rel in CASES])
def test_broken_folder_is_one_line_naming_the_file(kind, rel, outcomes):
    """Exit 2 and one `fastdit: error:` line naming the broken file or folder (an optional file removed: the run
    succeeds), with the subprocess's memory bounded."""
    result = outcomes[(kind, rel)]
    assert result["peak_mb"] < PEAK_RSS_LIMIT_MB, result
    if kind == "remove" and rel in OPTIONAL:
        assert result["code"] == 0, result
        return
    assert result["code"] == 2, result
    errors = [line for line in result["lines"] if not line.startswith("fastdit: warning:")]
    assert len(errors) == 1 and errors[0].startswith("fastdit: error: "), result
    named = rel if rel != "model_index.json" else "model_index.json is missing"
    assert named in errors[0], result

"""`fastdit bench --task edit`: the flags, their checks and the extra report lines (this module imports no torch;
the measurement is fastdit.bench.edit_dit)."""

from __future__ import annotations

from fastdit.errors import FastditError

# Text tokens of an Edit-2511 prompt with one 384^2 reference (its image tokens are in the text stream).
EDIT_TEXT_LEN = 330
T2I_TEXT_LEN = 128


def add_edit_arguments(parser) -> None:
    parser.add_argument(
        "--task",
        choices=["t2i", "edit"],
        default="t2i",
        help="edit: the Edit-2511 DiT step (zero_cond_t) with --refs reference images at the target's size "
        "appended to the image tokens, against diffusers' model on the same weights",
    )
    parser.add_argument("--refs", type=int, default=1, help="with --task edit: reference images (default 1)")


def default_text_len(task: str) -> int:
    return EDIT_TEXT_LEN if task == "edit" else T2I_TEXT_LEN


def check_edit_run(run, parallel: bool) -> None:
    """FastditError for what `--task edit` does not time."""
    if run.task != "edit":
        if run.refs != 1:
            raise FastditError("--refs needs --task edit")
        return
    if run.refs < 1:
        raise FastditError(f"--refs must be >= 1, got {run.refs}")
    unsupported = [
        flag
        for flag, on in (
            (f"--stage {run.stage}", run.stage != "dit"),
            ("--tp / --sp / --cfg-parallel", parallel),
            ("--compile full", run.compile == "full"),
            ("--no-cfg", run.no_cfg),
            ("--batch", run.batch != 1),
            ("--profile", run.profile),
        )
        if on
    ]
    if unsupported:
        raise FastditError(
            f"--task edit times one CFG step of the DiT (eager, --compile, --cuda-graph, --quantize, --compare); "
            f"it does not take {', '.join(unsupported)}"
        )


def bench_edit(run, device, dtype) -> dict:
    from fastdit.bench.edit_dit import bench_edit_dit

    return bench_edit_dit(run, device, dtype)


def print_edit_warmup(res: dict) -> None:
    """The compile warm-ups: the first step, and the first step at a second reference size and text length."""
    if res.get("task") != "edit":
        return
    second = res["shapes"]["second_shape"]
    for name, w in res["warmup"].items():
        first = res["runs"][name]["first_call_s"]
        print(
            f"{name}: warm-up {first:.1f} s at the first shape; {w['first_call_s']:.1f} s and {w['graphs']} new "
            f"graph(s) at a second ({second['image_tokens']} image, {second['text_tokens']} text tokens)"
        )

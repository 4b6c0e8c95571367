"""Multi-rank serving: `fastdit serve --tp N --sp N --cfg-parallel`.

The command's process binds the port, then starts the ranks with `fastdit.parallel.launch` (or is one
of torchrun's ranks) and supervises them:

- rank 0 serves HTTP on the bound socket and runs the engine; its generator is a `Leader`, which
  validates each call, broadcasts it to the other ranks, and runs rank 0's part of the pipeline;
- every other rank loads its shard and runs `follow`: receive a call, run the pipeline (the DiT's
  collectives need every rank), drop the images, repeat, until a stop message;
- control messages (the calls, the stop, one go/stop flag per denoising step) travel over a gloo group
  made for them, so they work beside NCCL ranks and never touch the accelerator.

Failure handling, so that nothing hangs:

- a call is checked on rank 0 before it is broadcast (size, prompt lengths, seeds drawn on rank 0), so
  followers only get work that the pipeline accepts; a follower that fails anyway, or dies, brings the
  whole server down: the launcher terminates the other ranks and the command exits with one line;
- a call that fails on rank 0 after it was broadcast leaves the ranks out of step: the engine stops
  (`GeneratorBroken`), rank 0 exits with an error, and the launcher terminates the followers;
- a batch whose clients all went away stops after a step on every rank (the per-step flag).

Signals: the ranks run in their own process groups, so a terminal's Ctrl-C reaches only the command,
which forwards SIGINT / SIGTERM to rank 0; rank 0 shuts down as the single-process server does and
then stops the followers; the command then exits as the single-process server would (by SIGTERM, or
130 after SIGINT). If the command dies, the kernel kills its ranks (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from PIL import Image

from fastdit.cli.common import ModelOptions
from fastdit.errors import FastditError, RunFailed
from fastdit.server.engine import GeneratorBroken
from fastdit.server.run import ServerOptions, load_generator, run_server

log = logging.getLogger("fastdit.server")

# Followers wait for work for as long as the server runs; the launcher (or the kernel, when the command
# dies) ends a follower whose rank 0 is gone, so this timeout is never what ends a wait.
CONTROL_TIMEOUT = timedelta(days=365)
_GO, _STOP = 0, 1  # the per-step flag


@dataclass(frozen=True)
class RankSetup:
    """What every rank of a multi-GPU server needs: the model folder, how to run it, the server's settings."""

    path: str
    model: ModelOptions
    server: ServerOptions
    tp: int
    sp: int
    cfg: int
    master_port: int | None = None


def check(path: str, model: ModelOptions, tp: int, sp: int, cfg: int) -> None:
    """Everything that can be checked before the ranks start: degrees, devices, the model's heads."""
    from fastdit.load import read_config
    from fastdit.parallel import check_parallel_config
    from fastdit.parallel.launch import check_world, device_type

    check_world(tp, sp, cfg, device_type(model.device))
    check_parallel_config(read_config(path), tp, sp)


# ---- the command's process: start the ranks, forward signals ---------------------------------------


def serve(setup: RankSetup, sock: socket.socket | None) -> int:
    """Run the ranks until rank 0's server stops; returns its exit status."""
    import torch.multiprocessing as mp

    from fastdit.parallel import RankError, launch
    from fastdit.runtime.env import under_torchrun

    spawned = not under_torchrun()
    leader_pid = mp.get_context("spawn").RawValue("q", 0) if spawned else None  # rank 0 writes its pid
    received: list[int] = []

    def forward(sig: int, frame) -> None:
        received.append(sig)
        if leader_pid.value:
            os.kill(leader_pid.value, sig)
        else:  # rank 0 is not up yet: unwind; the launcher terminates the ranks
            raise KeyboardInterrupt

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, forward) for sig in handled} if spawned else {}
    try:
        code = launch(
            _rank_main,
            setup,
            sock,
            leader_pid,
            tp=setup.tp,
            sp=setup.sp,
            cfg=setup.cfg,
            device=setup.model.device,
            master_port=setup.master_port,
        )
    except RankError as e:  # a rank died or raised: the launcher ended the others
        lines = str(e).strip().splitlines()
        if len(lines) > 1:  # the rank's traceback: to the log, above the one-line error
            log.error("%s", e)
        raise RunFailed(f"{lines[0]}; the server stopped") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if sock is not None:
            sock.close()
    if signal.SIGTERM in received:  # exit as the single-process server does: by the signal
        signal.raise_signal(signal.SIGTERM)
    if signal.SIGINT in received:
        return 130
    return int(code or 0)


# ---- every rank -------------------------------------------------------------------------------------


def _rank_main(state, setup: RankSetup, sock: socket.socket | None, leader_pid) -> int:
    import torch.distributed as dist

    if leader_pid is not None:  # spawned by `serve`: signals come through it, and die with it
        from torch.multiprocessing import _prctl_pr_set_pdeathsig

        os.setpgrp()
        _prctl_pr_set_pdeathsig(signal.SIGKILL)
    # Collective: every rank makes the control group, first thing, in the same order.
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    if state.rank == 0:
        if leader_pid is not None:
            leader_pid.value = os.getpid()
        return _lead(state, setup, sock, control)
    if sock is not None:
        sock.close()  # only rank 0 accepts connections
    follow(load_generator(setup.path, setup.model, state), control)
    return 0


def _lead(state, setup: RankSetup, sock: socket.socket, control) -> int:
    # uvicorn handles SIGTERM while it serves and re-raises it afterwards; here the re-raise must not kill
    # the process before the followers are stopped (the command exits by the signal instead).
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    # Made before the load, so that the followers get their stop even if rank 0 stops while it loads.
    leader = Leader(control)

    def load() -> Leader:
        leader.pipe = load_generator(setup.path, setup.model, state)
        return leader

    try:
        code = run_server(sock, load, setup.server)
    except GeneratorBroken as e:  # the launcher terminates the followers, stuck mid-call or not
        raise RunFailed(str(e)) from None
    leader.stop()
    return code


# ---- rank 0's generator and the followers' loop -----------------------------------------------------


def _send(control, message) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0, group=control)


def _receive(control):
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def _flag(control, value: int = _GO) -> int:
    """Rank 0 sends `value`; the others receive it."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([value], dtype=torch.int32)
    dist.broadcast(flag, src=0, group=control)
    return int(flag.item())


class _Stopped(Exception):
    """On a follower: rank 0 stopped the call after a step."""


class Leader:
    """Rank 0's generator (the engine's `Generator`): every call runs on all ranks."""

    def __init__(self, control, pipe=None):
        self.control = control
        self.pipe = pipe  # this rank's pipeline, set once loaded
        self._lock = threading.Lock()  # one control conversation at a time: a call, or the stop
        self._broken: str | None = None
        self._stopped = False

    def __getattr__(self, name: str):
        """The pipeline's attributes (what it takes: `max_images`, `output_size`, ...), once it is loaded."""
        pipe = self.__dict__.get("pipe")
        if pipe is None:
            raise AttributeError(name)
        return getattr(pipe, name)

    def __call__(
        self,
        prompt: str | list[str],
        *,
        height: int,
        width: int,
        seed: int | list[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
        **kwargs,
    ) -> list[Image.Image]:
        """`QwenImagePipeline.__call__`'s arguments (the size is required here: it is checked before
        broadcasting; the rest keep the pipeline's defaults and go to every rank as given)."""
        # Every rank must draw the same noise: rank 0 picks a missing seed.
        seed = secrets.randbits(63) if seed is None else seed
        call = {"prompt": prompt, "height": height, "width": width, "seed": seed, **kwargs}
        self._validate(call)  # a FastditError here fails this request alone; nothing was sent
        with self._lock:
            if self._broken is not None:
                raise GeneratorBroken(self._broken)
            if self._stopped:
                raise GeneratorBroken("the ranks were stopped")
            _send(self.control, ("generate", call))

            stopped = False

            def step(i: int, total: int) -> None:
                nonlocal stopped
                try:
                    if progress is not None:
                        progress(i, total)  # raises to stop the batch (every client went away)
                except BaseException:
                    stopped = True
                    _flag(self.control, _STOP)
                    raise
                _flag(self.control, _GO)

            try:
                return self.pipe(**call, progress=step, show_progress=show_progress)
            except BaseException as e:
                if stopped:  # every rank stopped after the same step: still in step
                    raise
                self._broken = (
                    f"a pipeline call failed on rank 0 after it was sent to every rank "
                    f"({type(e).__name__}: {e}); the ranks are out of step, so the server stopped"
                )
                raise GeneratorBroken(self._broken) from e

    def _validate(self, call: dict) -> None:
        """The pipeline's checks that a request can fail, run before anything is broadcast."""
        from fastdit.pipelines.text import check_lengths
        from fastdit.pipelines.vl_text import check_prompt_lengths
        from fastdit.validation import check_size

        check_size(call["height"], call["width"])
        prompts = [call["prompt"]] if isinstance(call["prompt"], str) else list(call["prompt"])
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise FastditError("prompt must be a non-empty string or a non-empty list of strings")
        # An edit's prompt goes to the vision-language template, whose limit is its own.
        check = check_prompt_lengths if call.get("image") is not None else check_lengths
        check(self.pipe.tokenizer, prompts, "prompt")
        negatives = call.get("negative_prompt")  # absent: no CFG
        if negatives is not None:
            negatives = [negatives] if isinstance(negatives, str) else list(negatives)
            check(self.pipe.tokenizer, negatives, "negative_prompt")

    def stop(self) -> None:
        """End the followers' loops (after the running call, if any); later calls raise. Once; not after
        a failure (the launcher ends the followers then)."""
        with self._lock:
            if self._stopped or self._broken is not None:
                return
            self._stopped = True
            try:
                _send(self.control, ("stop", None))
            except Exception as e:  # a follower already gone: the launcher reports it
                log.warning("could not stop the other ranks: %s", e)


def follow(pipe, control) -> None:
    """A follower's loop: run every call rank 0 sends, until it sends the stop."""

    def step(i: int, total: int) -> None:
        if _flag(control) == _STOP:
            raise _Stopped

    while True:
        kind, call = _receive(control)
        if kind == "stop":
            return
        try:
            pipe(**call, progress=step, show_progress=False)
        except _Stopped:
            continue

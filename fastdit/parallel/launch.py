"""Start the tp x sp x cfg ranks: spawned on this machine, or joined under torchrun.

`launch(fn, *args, tp=, sp=, cfg=, device=)` runs `fn(state, *args)` on every rank with a ready
`ParallelState` and returns rank 0's result. Three modes:

- one rank and no torchrun: runs in this process, no torch.distributed at all;
- torchrun (RANK / WORLD_SIZE set): this process is one rank; joins the env:// rendezvous;
- otherwise: spawns the ranks (torch.multiprocessing, start method "spawn") on 127.0.0.1 and a free
  port (or `master_port`). NCCL on CUDA (rank r on cuda:r), gloo on CPU. This process hosts the ranks'
  rendezvous store (as torchrun's agent does), so it outlives every rank: rank 0 hosting it would take
  it down while the others' NCCL watchdogs still poll it at exit.

Everything that can be checked before work starts is (world size against the devices, port in use);
those errors are `FastditError`s. When a rank fails, the others are terminated (never left hanging in a
collective) and `launch` raises that rank's error: a `FastditError` or `RunFailed` from a rank is re-raised as
is, any other exception as `RankError` carrying the rank's message and traceback.
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdit.errors import FastditError, RunFailed
from fastdit.parallel.state import ParallelState, check_degrees, make_parallel_state, single_device
from fastdit.runtime.env import under_torchrun

# On CPU (gloo) any count works, but each rank is a full process with its own copy of the replicated
# weights: more than this is a typo, not a plan.
MAX_CPU_RANKS = 16


class RankError(RuntimeError):
    """A rank failed with an exception that is not a FastditError; holds its rank, message and traceback."""

    def __init__(self, rank: int, message: str, tb: str = ""):
        super().__init__(f"rank {rank} failed: {message}" + (f"\n{tb}" if tb else ""))
        self.rank = rank


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise FastditError(f"--master-port must be a port number in 1..65535, got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise FastditError(
                f"--master-port {port} is already in use on 127.0.0.1 ({e.strerror}); pick another port "
                f"or leave it out to use a free one"
            ) from None


def device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except RuntimeError as e:
        raise FastditError(f"bad device {device!r}: {e}") from None


def check_world(tp: int, sp: int, cfg: int, dev_type: str) -> int:
    """The world size tp * sp * cfg, checked against what this machine has; FastditError if it can't run."""
    check_degrees(tp, sp, cfg)
    world = tp * sp * cfg
    if under_torchrun():
        n = int(os.environ["WORLD_SIZE"])
        if n != world:
            raise FastditError(f"torchrun started {n} ranks, but tp={tp} x sp={sp} x cfg={cfg} needs {world}")
        return world
    if dev_type == "cuda":
        n = torch.cuda.device_count()
        if world > n:
            raise FastditError(
                f"tp={tp} x sp={sp} x cfg={cfg} needs {world} GPUs, but this machine has {n}; lower the degrees"
            )
    elif dev_type == "cpu":
        if world > MAX_CPU_RANKS:
            raise FastditError(f"tp={tp} x sp={sp} x cfg={cfg} = {world} CPU ranks; at most {MAX_CPU_RANKS}")
    elif world > 1:
        raise FastditError(f"parallel runs need CUDA (NCCL) or CPU (gloo) devices, not {dev_type}")
    return world


def _init_rank(rank: int, world: int, local_rank: int, dev_type: str, port: int | None) -> torch.device:
    """Join the process group: through the launcher's store on 127.0.0.1:`port`, or torchrun's env://."""
    if dev_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        # Ranks share the cores: one rank per core's worth of threads, not every rank using all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        backend = "gloo"
    timeout = timedelta(minutes=10)
    if port is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    else:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return device


def _picklable(e: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return None


def _worker(rank, world, port, tp, sp, cfg, dev_type, fn, args, queue) -> None:
    try:
        device = _init_rank(rank, world, rank, dev_type, port)
        state = make_parallel_state(tp, sp, cfg, device)
        result = fn(state, *args)
        if rank == 0:
            # Plain pickle: torch.multiprocessing would share tensors through this process's shared
            # memory, which is gone once it exits.
            queue.put(("result", rank, pickle.dumps(result)))
    except BaseException as e:
        queue.put(("error", rank, (_picklable(e), f"{type(e).__name__}: {e}", traceback.format_exc())))
        raise  # the spawn wrapper exits non-zero; the parent terminates the other ranks
    _destroy_process_group()


def _destroy_process_group() -> None:
    """Collect garbage first: a CUDA graph with NCCL collectives recorded in it (a pipeline's `--cuda-graph`
    step) must be gone before its communicators are destroyed, else the rank hangs at exit."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    dist.destroy_process_group()


def _raise_rank_error(rank: int, payload) -> None:
    exc, message, tb = payload
    if isinstance(exc, FastditError | RunFailed):
        raise exc
    raise RankError(rank, message, tb)


def launch(
    fn: Callable,
    *args,
    tp: int = 1,
    sp: int = 1,
    cfg: int = 1,
    device: str | torch.device | None = None,
    master_port: int | None = None,
    timeout_s: float | None = None,
):
    """Run `fn(state, *args)` on tp * sp * cfg ranks; returns rank 0's result (each rank's own under torchrun).

    `fn` and `args` must pickle (a module-level function) when ranks are spawned.
    """
    dev_type = device_type(device)
    world = check_world(tp, sp, cfg, dev_type)
    if under_torchrun():
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        dev = _init_rank(rank, world, local_rank, dev_type, None)
        try:
            return fn(make_parallel_state(tp, sp, cfg, dev), *args)
        finally:
            _destroy_process_group()
    if world == 1:
        return fn(_single(device, dev_type), *args)
    if master_port is None:
        master_port = free_port()
    else:
        check_port(master_port)
    store = dist.TCPStore("127.0.0.1", master_port, is_master=True, wait_for_workers=False)

    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(
        _worker,
        args=(world, master_port, tp, sp, cfg, dev_type, fn, args, queue),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    messages: list[tuple] = []

    def drain():
        while not queue.empty():
            messages.append(queue.get())

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                done = ctx.join(timeout=0.1)  # on a failure: terminates the other ranks, then raises
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                drain()
                errors = [m for m in messages if m[0] == "error"]
                if errors:  # the first error queued is the cause; later ones are peers losing it
                    _raise_rank_error(errors[0][1], errors[0][2])
                raise RankError(e.error_index, str(e).strip()) from None
            drain()
            if done:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise RankError(-1, f"the ranks did not finish within {timeout_s} s; terminated them")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
        del store  # closes the port once no rank is left to poll it
    results = [m for m in messages if m[0] == "result"]
    return pickle.loads(results[0][2]) if results else None


def _single(device, dev_type: str) -> ParallelState:
    if device is None:
        return single_device("cuda" if dev_type == "cuda" else "cpu")
    return single_device(device)

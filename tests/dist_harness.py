"""Run a function on N CPU processes with gloo, with a hard timeout (for the distributed tests)."""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():  # a failed pipeline closes its groups itself
            dist.destroy_process_group()
    # The rank's work and its process group are done: leave without interpreter finalisation.
    # After a refused compile (a collective, then the raise), finalisation aborted a gloo
    # rank about once in a dozen runs ("terminate called without an active exception");
    # what is tested has already finished, and the abort is recorded in docs/runtime.md.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world: int, *args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; raise with every rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, errors), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        raise AssertionError("\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(failures)))
    if alive:
        raise AssertionError(f"{len(alive)} rank(s) still running after {timeout:.0f} s: killed")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with {bad}")

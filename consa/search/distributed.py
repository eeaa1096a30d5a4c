"""Data-parallel search: one process per GPU, each on its own rows, gates kept identical everywhere.

Started by `torchrun --nproc-per-node N -m consa search ...` (the environment says the rank) or, in
a worker that owns several GPUs, by `helpers(...)`, which runs ranks 1..N-1 in child processes
while the caller is rank 0. Per step every rank computes the task loss on its own `batch_size`
rows; one all-reduce averages the gate gradients (and carries the loss for the log and rank 0's
cancel flag). The penalty term, the multipliers and the final allocation are computed from
log_alpha, which the identical averaged gradients keep identical on every rank, so they need no
communication. Rank 0 reports progress and writes the outputs.

What N changes and what it does not: step s of rank r reads rows (s*N + r)*B ... (s*N + r)*B + B-1
of the shuffled order, so N GPUs x batch B read exactly the rows that one GPU with batch N*B reads,
and every rank draws the same gate noise (same seed, same draws). Both runs therefore compute the
same loss up to floating-point summation order (an average of N per-rank means vs one mean: equal
in exact arithmetic when every rank holds B rows); bf16 kernels and the all-reduce's order make the
gates agree to rounding, not bit for bit. Against one GPU with batch B the allocation differs
within the noise of a larger batch: N times the rows per step.
"""

import os
import socket
from contextlib import contextmanager

import torch

from consa.model.devices import shutdown


# -- several GPUs from one caller (a service worker) ----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helper_rank(rank: int, world_size: int, port: int, config_dict: dict, devices: list[str], resume_from) -> None:
    from consa.core.config import SearchConfig
    from consa.search.loop import run_search

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    from consa.core.errors import Cancelled

    try:
        run_search(SearchConfig.from_dict(config_dict), device=devices[rank], resume_from=resume_from)
    except Cancelled:
        pass  # rank 0's cancel reached every rank through the step's all-reduce; rank 0 reports it
    finally:
        shutdown()


@contextmanager
def helpers(config, world_size: int, devices: list[str] | None = None, resume_from=None):
    """Run ranks 1..world_size-1 of `config`'s search in child processes; the caller is rank 0 for the
    duration (its run_search joins the group through the environment) and runs on devices[0].
    `resume_from`: the state rank 0 resumes from; every rank must start from the same one.

        with helpers(config, 2) as device:
            run_search(config, device=device, progress=..., should_cancel=...)
    """
    if world_size <= 1:
        yield None
        return
    import torch.multiprocessing as mp

    devices = devices or ([f"cuda:{i}" for i in range(world_size)] if torch.cuda.is_available()
                          else ["cpu"] * world_size)
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK="0",
                      LOCAL_RANK="0")
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    procs = [ctx.Process(target=_helper_rank, args=(r, world_size, port, config.to_dict(), devices, resume_from), daemon=True)
             for r in range(1, world_size)]
    for p in procs:
        p.start()
    ok = False
    try:
        yield devices[0]
        ok = True
    finally:
        shutdown()
        for p in procs:
            if not ok:
                p.terminate()  # rank 0 failed or was cancelled: a helper may be waiting in a collective
            p.join(timeout=60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"a search helper process failed (exit codes {failed})")

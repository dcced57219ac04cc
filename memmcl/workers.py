"""Worker processes of `memmcl pipeline`: independent phases (experts, multi-task baselines) run side by side."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from memmcl.rundir import init_worker

if TYPE_CHECKING:
    from memmcl.run import RunContext

log = logging.getLogger(__name__)


def run_in_workers(p: RunContext, jobs: list[tuple[str, Callable, tuple]], total: int) -> None:
    """Runs phases (name, function(pipeline, *args), args) in `expert.workers` processes when there are several
    and the run is on one CPU device (a tiny model's step is mostly per-op overhead, so two single-thread
    processes train ~1.5x faster than one with two threads); else leaves them to the caller's loop. `total`: how
    many phases the set has, done ones included; it alone sets each worker's threads (`phase_threads`)."""
    if not _in_workers(p) or len(jobs) <= 1:
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    t = p.trainer_config
    workers = min(p.expert.workers, len(jobs))
    threads = phase_threads(p, total)
    worker_view = copy.copy(p)
    worker_view.trainer_config = dataclasses.replace(t, progress_bar=False)
    log.info("running %d phases in %d processes of %d thread(s)", len(jobs), workers, threads)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_phase_job, worker_view, name, fn, args): name for name, fn, args in jobs}
        bar = None
        if t.progress_bar:  # the workers' own bars are off: one bar over the phases here
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=jobs[0][0].split(":")[0] + " phases", unit="phase")
        for future in as_completed(futures):
            p.phases[futures[future]] = future.result()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()


def phase_threads(p: RunContext, total: int) -> int:
    """The torch threads of one phase of a set of `total` run in workers: the threads shared by as many workers as
    the whole set fills, however many of its phases are left to do. The thread count decides how a GEMM splits its
    sums, so a phase run on resume (alone, or beside fewer others) does the same arithmetic as in a fresh run."""
    return max(1, torch.get_num_threads() // max(1, min(p.expert.workers, total)))


def _in_workers(p: RunContext) -> bool:
    t = p.trainer_config
    return p.expert.workers > 1 and t.accelerator == "cpu" and t.strategy in ("auto", "single_device") \
        and str(t.devices) == "1" and t.num_nodes == 1


@contextlib.contextmanager
def worker_threads(p: RunContext, total: int):
    """Within: where phases run in worker processes, torch runs with one worker's threads (`phase_threads` of a set
    of `total`), so a phase that runs here alone (the one left to do, a retrain) does the same arithmetic as it does
    beside others: a resumed run equals an uninterrupted one bit for bit."""
    if not _in_workers(p):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(phase_threads(p, total))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _phase_job(pipeline: RunContext, name: str, fn: Callable, args: tuple) -> dict:
    """Runs one phase in a worker process; returns its phase record."""
    fn(pipeline, *args)
    return pipeline.phases[name]

"""Worker processes of `memmcl pipeline`: independent phases (experts, multi-task baselines) run side by side."""

from __future__ import annotations

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


def run_in_workers(p: RunContext, jobs: list[tuple[str, Callable, tuple]]) -> None:
    """Runs phases (name, function(pipeline, *args), args) in `expert.workers` processes when there are several
    and the run is on one CPU device (a tiny model's step is mostly per-op overhead, so two single-thread
    processes train ~1.5x faster than one with two threads); else leaves them to the caller's loop."""
    t = p.trainer_config
    if p.expert.workers <= 1 or len(jobs) <= 1 or t.accelerator != "cpu" or t.strategy not in ("auto", "single_device") \
            or str(t.devices) != "1" or t.num_nodes != 1:
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(p.expert.workers, len(jobs))
    threads = max(1, torch.get_num_threads() // workers)
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


def _phase_job(pipeline: RunContext, name: str, fn: Callable, args: tuple) -> dict:
    """Runs one phase in a worker process; returns its phase record."""
    fn(pipeline, *args)
    return pipeline.phases[name]

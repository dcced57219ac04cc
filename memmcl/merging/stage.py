"""One stage of the merge search: DEAP proposes genomes, `MergeScorer.evaluate` scores them on weak data, the state is
saved after every generation (resume), TensorBoard gets the best genome's fitness, accuracies and weights.

Fitness of a genome, from each task's standard metric (`TaskSpec.metric`: accuracy unless the spec says otherwise,
an extraction task's tuple micro-F1) on the stage's weak data:
- `mean`: Σ w_task · metric_task / Σ w_task (`task_weights`, default 1 each).
- `protect`: (mean + `worst_weight` · worst unit) / (1 + `worst_weight`), where the units are the stage's groups (the
  global stage) or its tasks (a group's own stage), each unit's accuracy the weighted mean of its tasks. A genome that
  gives a whole group away scores low even when the mean rises.
- `nsga2` (an algorithm, not a fitness): one objective per unit; the stage keeps the Pareto front and returns its knee.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import lightning as L
import torch
import yaml

from memmcl.merging import evolution
from memmcl.merging.factors import MergeError, coefficients_to_yaml
from memmcl.rundir import inside, write_atomic

if TYPE_CHECKING:
    from memmcl.merging.scorer import MergeScorer
    from memmcl.tasks.spec import TaskSpec

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_progress_bar(trainer: L.Trainer):
    """Hides the per-call progress bar while the search runs thousands of short validate/predict calls."""
    bar = trainer.progress_bar_callback
    enabled = bar is not None and bar.is_enabled
    if enabled:
        bar.disable()
    try:
        yield
    finally:
        if enabled:
            bar.enable()


def stage_units(tasks: list[str], task_group: dict[str, str]) -> dict[str, list[str]]:
    """Returns the units a stage protects: its groups when it spans several, else its tasks one by one."""
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(task_group[t], []).append(t)
    return groups if len(groups) > 1 else {t: [t] for t in tasks}


def weighted_mean(results: dict, tasks: list[str], weights: dict[str, float]) -> float:
    total = sum(weights.get(t, 1.0) for t in tasks)
    return sum(weights.get(t, 1.0) * results[t]["metric"] for t in tasks) / total


def unit_objectives(results: dict, units: dict[str, list[str]], weights: dict[str, float]) -> list[float]:
    """Returns each unit's weighted mean metric, in the units' order."""
    return [weighted_mean(results, tasks, weights) for tasks in units.values()]


def scalar_fitness(results: dict, units: dict[str, list[str]], weights: dict[str, float], fitness: str,
                   worst_weight: float) -> float:
    mean = weighted_mean(results, list(results), weights)
    if fitness == "mean":
        return mean
    return (mean + worst_weight * min(unit_objectives(results, units, weights))) / (1.0 + worst_weight)


def genome_key(genome, bounds: tuple[float, float]) -> tuple[float, ...]:
    """The genome as evaluated: clipped to the bounds and rounded (the fitness cache's key)."""
    low, high = bounds
    return tuple(round(float(min(max(v, low), high)), 8) for v in genome)


def genome_coefficients(key: tuple[float, ...], basis: torch.Tensor, blocks: int) -> torch.Tensor:
    """Maps a flat genome (blocks × members), as evaluated, through the members' coefficient matrices [M, blocks, T]."""
    x = torch.tensor(key, dtype=torch.float32).view(blocks, basis.shape[0])
    return torch.einsum("bm,mbt->bt", x, basis)


def run_stage(search: MergeScorer, trainer: L.Trainer, stage: str, basis: torch.Tensor, member_names: list[str],
              weak: list[TaskSpec], resume: bool, show_progress: bool) -> dict:
    """Runs one DEAP search; returns {genome, coefficients, fitness, uniform_fitness, per_task[, front]}."""
    h = search.hparams
    stage_dir = inside(search.out_dir, "stages", stage)
    state_path, result_path = stage_dir / "state.json", stage_dir / "result.yaml"
    if resume and result_path.exists():
        log.info("stage %s: done before, reusing %s", stage, result_path)
        return yaml.safe_load(result_path.read_text())
    dm = search.datamodule(weak)
    units = stage_units([s.name for s in weak], search.task_group)
    weights = h.task_weights or {}
    n_objectives = len(units) if h.algorithm == "nsga2" else 1
    centroid = [1.0 / basis.shape[0]] * (basis.shape[0] * h.blocks)  # the uniform merge of the members
    if resume and state_path.exists():
        try:
            state = evolution.load_state(state_path.read_bytes(), str(state_path))
        except ValueError as err:
            raise MergeError(f"{err}; delete it to restart stage '{stage}'") from None
        log.info("stage %s: resuming after generation %d", stage, state["generation"])
    else:
        state = evolution.new_state(h.algorithm, centroid, h.sigma, h.population, h.seed)
    cache: dict[tuple, dict] = state["cache"]

    def results(genome) -> dict:
        key = genome_key(genome, h.bounds)
        if key not in cache:  # identical genomes are evaluated once
            cache[key] = search.evaluate(trainer, genome_coefficients(key, basis, h.blocks), dm)
        return cache[key]

    def score(genome):
        if h.algorithm == "nsga2":
            return tuple(unit_objectives(results(genome), units, weights))
        return (scalar_fitness(results(genome), units, weights, h.fitness, h.worst_weight),)

    uniform = sum(score(centroid)) / n_objectives
    progress = None
    if trainer.is_global_zero and show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=h.generations, initial=state["generation"], desc=f"merge {stage}", unit="gen")
    while state["generation"] < h.generations:
        population = evolution.propose(state, h.algorithm, centroid, h.sigma, h.population, n_objectives)
        for ind in population:
            ind.fitness.values = score(ind)
        evolution.tell(state, h.algorithm, population, (centroid, uniform))
        _log_generation(search, trainer, stage, state, member_names)
        if trainer.is_global_zero:
            write_atomic(state_path, evolution.dump_state(state))
        trainer.strategy.barrier()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(best=f"{state['best'][1]:.4f}")
        search.after_generation(stage, state["generation"])
    if progress is not None:
        progress.close()
    genome, fit = state["best"]
    key = genome_key(genome, h.bounds)
    result = {
        "stage": stage,
        "members": member_names,
        "genome": list(key),
        "fitness": float(fit),
        "uniform_fitness": float(uniform),
        "per_task": cache[key],
        "coefficients": coefficients_to_yaml(genome_coefficients(key, basis, h.blocks), search.names),
        "history": state["history"],
    }
    if h.algorithm == "nsga2":
        result["objectives"] = list(units)
        result["front"] = [{"genome": list(genome_key(g, h.bounds)), "objectives": o}
                           for g, o in evolution.pareto_front(state["population"])]
    if trainer.is_global_zero:
        write_atomic(result_path, yaml.safe_dump(result, sort_keys=False).encode())
    trainer.strategy.barrier()
    return result


def tune_task_arithmetic(search: MergeScorer, trainer: L.Trainer, weak: list[TaskSpec], scales: list[float]) -> dict:
    """Task arithmetic with one tuned scale (Ilharco et al., 2023), the simplest searched merge and a baseline:
    base + λ Σ_t ΔLoRA_t, λ picked from `scales` by the search's fitness on the union of weak data (the first of
    equals). Returns {scale, fitness, fitness_by_scale, coefficients}."""
    h = search.hparams
    dm = search.datamodule(weak)
    units = stage_units([s.name for s in weak], search.task_group)
    T = search.model.n_experts
    by_scale = {}
    for scale in scales:
        res = search.evaluate(trainer, torch.full((h.blocks, T), float(scale)), dm)
        by_scale[float(scale)] = scalar_fitness(res, units, h.task_weights or {}, h.fitness, h.worst_weight)
    best = max(by_scale, key=lambda s: (by_scale[s], -list(by_scale).index(s)))
    return {"scale": best, "fitness": by_scale[best], "fitness_by_scale": by_scale,
            "coefficients": coefficients_to_yaml(torch.full((h.blocks, T), best), search.names)}


def _log_generation(search: MergeScorer, trainer: L.Trainer, stage: str, state: dict, member_names: list[str]) -> None:
    logger = trainer.logger
    if logger is None:
        return
    h = search.hparams
    genome, fit = state["best"]
    key = genome_key(genome, h.bounds)
    metrics = {f"merge/{stage}/best_fitness": fit, f"merge/{stage}/mean_fitness": state["history"][-1]["mean"]}
    metrics.update({f"merge/{stage}/best_acc/{t}": r["acc"] for t, r in state["cache"][key].items()})
    x = torch.tensor(key).view(h.blocks, len(member_names))
    for b in range(h.blocks):
        for m, name in enumerate(member_names):
            suffix = f"/block{b}" if h.blocks > 1 else ""
            metrics[f"merge/{stage}/weight/{name}{suffix}"] = float(x[b, m])
    logger.log_metrics(metrics, step=state["generation"])

"""The DEAP side of the merge search: a search state saved as JSON, `propose` a generation, `tell` it its fitness.

`cmaes` and `ga` maximise one fitness. `nsga2` maximises several objectives at once (one per group, or per task in a
group's own stage): DEAP's NSGA-II selection keeps a population on the Pareto front, and `knee` picks one member.

DEAP draws from numpy's and Python's global RNGs, which Lightning re-seeds in every DDP trainer call, so the state
keeps its own streams and swaps them in only while DEAP draws. With the same seed, the same genomes come out on every
rank and after a resume.
"""

from __future__ import annotations

import json
import random
from typing import Literal

import numpy as np

Algorithm = Literal["cmaes", "ga", "nsga2"]


def individual_class(objectives: int = 1):
    """Returns DEAP's individual class for `objectives` maximised values (created once: creating twice warns)."""
    from deap import base, creator

    suffix = "" if objectives == 1 else str(objectives)
    if not hasattr(creator, f"MemmclIndividual{suffix}"):
        creator.create(f"MemmclFitness{suffix}", base.Fitness, weights=(1.0,) * objectives)
        creator.create(f"MemmclIndividual{suffix}", list, fitness=getattr(creator, f"MemmclFitness{suffix}"))
    return getattr(creator, f"MemmclIndividual{suffix}")


def new_state(algorithm: Algorithm, centroid: list[float], sigma: float, population: int, seed: int) -> dict:
    """Returns a fresh search state: generation 0, empty fitness cache, the strategy and its own RNG streams."""
    from deap import cma

    return {
        "generation": 0, "cache": {}, "best": None, "history": [], "population": None,  # GA / NSGA-II parents
        "np_rng": np.random.RandomState(seed).get_state(), "py_rng": random.Random(seed).getstate(),
        "strategy": cma.Strategy(centroid=centroid, sigma=sigma, lambda_=population) if algorithm == "cmaes" else None,
    }


def propose(state: dict, algorithm: Algorithm, centroid: list[float], sigma: float, population: int,
            objectives: int = 1) -> list:
    """Returns the next generation's individuals (CMA-ES samples, or GA / NSGA-II offspring of the last generation;
    NSGA-II's first generation holds the centroid, so the front is never dominated by the uniform merge)."""
    Individual = individual_class(objectives)
    if algorithm == "cmaes":
        saved = np.random.get_state()
        np.random.set_state(state["np_rng"])
        try:
            return state["strategy"].generate(Individual)
        finally:
            state["np_rng"] = np.random.get_state()
            np.random.set_state(saved)
    rng = random.Random()
    rng.setstate(state["py_rng"])
    if state["population"] is None:
        children = [Individual([c + rng.gauss(0, sigma) for c in centroid]) for _ in range(population)]
        if algorithm == "nsga2":
            children[0] = Individual(list(centroid))
    else:
        children = _offspring(state["population"], rng, sigma, population, algorithm, Individual)
    state["py_rng"] = rng.getstate()
    return children


def _scored(scored: list, Individual) -> list:
    out = []
    for genome, fit in scored:
        ind = Individual(genome)
        ind.fitness.values = tuple(fit) if isinstance(fit, list | tuple) else (fit,)
        out.append(ind)
    return out


def _offspring(scored: list, rng: random.Random, sigma: float, population: int, algorithm: Algorithm, Individual) -> list:
    """One generation of DEAP operators: tournament (NSGA-II: by front rank and crowding distance), blend crossover,
    Gaussian mutation; the GA keeps its elite."""
    from deap import tools

    parents = _scored(scored, Individual)
    saved = random.getstate()  # DEAP's operators draw from the `random` module: run them on our own stream
    random.setstate(rng.getstate())
    try:
        if algorithm == "nsga2":
            parents = tools.selNSGA2(parents, len(parents))  # assigns the crowding distances the tournament reads
            chosen = tools.selTournamentDCD(parents, population) if population % 4 == 0 else tools.selRandom(parents, population)
        else:
            chosen = tools.selTournament(parents, population, tournsize=3)
        children = [Individual(list(c)) for c in chosen]
        for a, b in zip(children[::2], children[1::2], strict=False):
            if random.random() < 0.5:
                tools.cxBlend(a, b, alpha=0.3)
        for c in children:
            tools.mutGaussian(c, mu=0.0, sigma=sigma, indpb=0.5)
        if algorithm == "ga":
            children[0] = Individual(list(max(parents, key=lambda ind: ind.fitness.values[0])))
        rng.setstate(random.getstate())
    finally:
        random.setstate(saved)
    return children


def knee(front: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """Returns the front's most balanced member: each objective scaled to [0, 1] over the front, the member whose
    smallest scaled objective is largest (ties: the larger mean objective, then the earlier member)."""
    values = np.array([objs for _, objs in front], dtype=float)
    low, high = values.min(0), values.max(0)
    scaled = np.where(high > low, (values - low) / np.where(high > low, high - low, 1.0), 1.0)
    best = max(range(len(front)), key=lambda i: (scaled[i].min(), values[i].mean(), -i))
    return front[best]


def pareto_front(scored: list[tuple[list[float], list[float]]]) -> list[tuple[list[float], list[float]]]:
    """Returns the non-dominated members of `scored` (genome, objectives), duplicates of a genome once."""
    seen, unique = set(), []
    for genome, objs in scored:
        if tuple(genome) not in seen:
            seen.add(tuple(genome))
            unique.append((list(genome), list(objs)))
    return [(g, o) for g, o in unique
            if not any(all(b >= a for a, b in zip(o, p, strict=True)) and p != o for _, p in unique)]


def tell(state: dict, algorithm: Algorithm, individuals: list, baseline: tuple[list[float], float]) -> None:
    """Feeds a scored generation back: updates the strategy (or GA parents), the best so far and the history.

    `baseline` (the uniform merge and its fitness) wins generation 0 if strictly better, so the best is never below it.
    """
    if algorithm == "nsga2":
        _tell_nsga2(state, individuals)
        return
    if algorithm == "cmaes":
        state["strategy"].update(individuals)
    else:
        state["population"] = [([float(v) for v in ind], float(ind.fitness.values[0])) for ind in individuals]
    fits = [float(ind.fitness.values[0]) for ind in individuals]
    candidates = [([float(v) for v in ind], f) for ind, f in zip(individuals, fits, strict=True)]
    if state["best"] is not None:
        candidates.insert(0, state["best"])
    elif baseline[1] > max(fits):
        candidates.insert(0, (list(baseline[0]), float(baseline[1])))
    _next_generation(state, max(candidates, key=lambda c: c[1]), fits)  # the first of equals: an earlier best is kept


def _next_generation(state: dict, best: tuple[list[float], float], fits: list[float]) -> None:
    """Closes a generation: its best so far, the generation count and a history row over its (mean) fitness."""
    state["best"] = best
    state["generation"] += 1
    state["history"].append({"generation": state["generation"], "best": best[1], "mean": float(np.mean(fits)),
                             "max": max(fits), "evaluated": len(state["cache"])})


def _tell_nsga2(state: dict, individuals: list) -> None:
    """NSGA-II: parents + offspring → the next parents by non-dominated sorting and crowding distance; the best is
    the knee of the parents' first front, its fitness the mean of its objectives."""
    from deap import tools

    scored = [([float(v) for v in ind], [float(x) for x in ind.fitness.values]) for ind in individuals]
    pool = _scored((state["population"] or []) + scored, type(individuals[0]))
    state["population"] = [([float(v) for v in ind], [float(x) for x in ind.fitness.values])
                           for ind in tools.selNSGA2(pool, len(individuals))]
    genome, objs = knee(pareto_front(state["population"]))
    _next_generation(state, (genome, float(np.mean(objs))), [float(np.mean(o)) for _, o in scored])


STATE_KEYS = {"generation", "cache", "best", "history", "population", "np_rng", "py_rng", "strategy"}


def _encode(value):
    from deap import cma

    if isinstance(value, cma.Strategy):
        return {"__cma__": _encode(vars(value))}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    return value


def _decode(value):
    from deap import cma

    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__cma__" in value:
        strategy = object.__new__(cma.Strategy)  # plain attributes only: nothing in the file is executed
        strategy.__dict__.update(_decode(value["__cma__"]))
        return strategy
    if "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k): _decode(v) for k, v in value["__items__"]}
    return {k: _decode(v) for k, v in value.items()}


def dump_state(state: dict) -> bytes:
    """Returns the search state as JSON (exact: floats and RNG streams round-trip), never a pickle."""
    return json.dumps(_encode(state)).encode()


def load_state(data: bytes, source: str) -> dict:
    """Returns a search state read by `dump_state`; anything else is a ValueError naming `source`."""
    try:
        state = _decode(json.loads(data))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{source}: not a search state written by memmcl ({err})") from None
    if not isinstance(state, dict) or set(state) != STATE_KEYS:
        raise ValueError(f"{source}: not a search state written by memmcl (expected keys {sorted(STATE_KEYS)})")
    return state

"""The DEAP side of the merge search: a search state saved as JSON, `propose` a generation, `tell` it its fitness.

DEAP draws from numpy's and Python's global RNGs, which Lightning re-seeds in every DDP trainer call, so the state
keeps its own streams and swaps them in only while DEAP draws. With the same seed, the same genomes come out on every
rank and after a resume.
"""

from __future__ import annotations

import json
import random
from typing import Literal

import numpy as np

Algorithm = Literal["cmaes", "ga"]


def individual_class():
    """Returns DEAP's individual class for a maximised single fitness (created once: creating twice warns)."""
    from deap import base, creator

    if not hasattr(creator, "MemmclFitness"):
        creator.create("MemmclFitness", base.Fitness, weights=(1.0,))
        creator.create("MemmclIndividual", list, fitness=creator.MemmclFitness)
    return creator.MemmclIndividual


def new_state(algorithm: Algorithm, centroid: list[float], sigma: float, population: int, seed: int) -> dict:
    """Returns a fresh search state: generation 0, empty fitness cache, the strategy and its own RNG streams."""
    from deap import cma

    return {
        "generation": 0, "cache": {}, "best": None, "history": [], "population": None,
        "np_rng": np.random.RandomState(seed).get_state(), "py_rng": random.Random(seed).getstate(),
        "strategy": cma.Strategy(centroid=centroid, sigma=sigma, lambda_=population) if algorithm == "cmaes" else None,
    }


def propose(state: dict, algorithm: Algorithm, centroid: list[float], sigma: float, population: int) -> list:
    """Returns the next generation's individuals (CMA-ES samples, or GA offspring of the last generation)."""
    Individual = individual_class()
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
    else:
        children = _ga_offspring(state["population"], rng, sigma, population)
    state["py_rng"] = rng.getstate()
    return children


def _ga_offspring(scored: list[tuple[list[float], float]], rng: random.Random, sigma: float, population: int) -> list:
    """One (mu + lambda) GA generation: tournament, blend crossover, Gaussian mutation, the elite kept (DEAP operators)."""
    from deap import tools

    Individual = individual_class()
    parents = []
    for genome, fit in scored:
        ind = Individual(genome)
        ind.fitness.values = (fit,)
        parents.append(ind)
    saved = random.getstate()  # DEAP's operators draw from the `random` module: run them on our own stream
    random.setstate(rng.getstate())
    try:
        children = [Individual(list(c)) for c in tools.selTournament(parents, population, tournsize=3)]
        for a, b in zip(children[::2], children[1::2], strict=False):
            if random.random() < 0.5:
                tools.cxBlend(a, b, alpha=0.3)
        for c in children:
            tools.mutGaussian(c, mu=0.0, sigma=sigma, indpb=0.5)
        children[0] = Individual(list(max(parents, key=lambda ind: ind.fitness.values[0])))
        rng.setstate(random.getstate())
    finally:
        random.setstate(saved)
    return children


def tell(state: dict, algorithm: Algorithm, individuals: list, baseline: tuple[list[float], float]) -> None:
    """Feeds a scored generation back: updates the strategy (or GA parents), the best so far and the history.

    `baseline` (the uniform merge and its fitness) wins generation 0 if strictly better, so the best is never below it.
    """
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
    state["best"] = max(candidates, key=lambda c: c[1])  # the first of equals: an earlier best is kept
    state["generation"] += 1
    state["history"].append({"generation": state["generation"], "best": state["best"][1], "mean": float(np.mean(fits)),
                             "max": max(fits), "evaluated": len(state["cache"])})


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

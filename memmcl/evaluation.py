"""The evaluation matrix of `memmcl pipeline`: every model of the roster on every task's test split, one scorer.

The models, their names and `CLAIMS` (the differences the method claims) are `memmcl.roster`'s; each claim gets a paired bootstrap interval (`memmcl.bootstrap`) from the
models' per-example correctness, kept in results.json as one '0'/'1' string per task in test-example-id order.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from memmcl.bootstrap import RESAMPLES, paired_bootstrap
from memmcl.roster import CLAIMS, FINAL, ICL_MODELS, group_means
from memmcl.rundir import config_hash, inside, write_json
from memmcl.settings import demo_settings

if TYPE_CHECKING:
    from memmcl.run import RunContext

def encode_correct(draws: dict[str, list[dict[str, dict[str, bool]]]]) -> dict[str, dict[str, list[str]]]:
    """Returns {model: {task: one '0'/'1' string per draw}} from {model: [per draw {task: {example id: correct}}]},
    in id order; every model and draw must cover the same test examples (ids) as the first one with that task."""
    reference: dict[str, list[str]] = {}
    out = {}
    for model, runs in draws.items():
        for run in runs:
            for task, hits in run.items():
                if list(hits) != reference.setdefault(task, list(hits)):
                    raise ValueError(f"eval: model {model!r}, task {task!r}: its test example ids differ from an "
                                     "earlier model's; expected every model on the same test sample")
        out[model] = {task: ["".join("1" if hit else "0" for hit in run[task].values()) for run in runs]
                      for task in runs[0]}
    return out


def decode_correct(draws: list[str]) -> np.ndarray:
    """Returns each example's correctness of one model on one task, its mean over the draws (demonstration seeds)."""
    return np.array([[c == "1" for c in s] for s in draws], dtype=float).mean(axis=0)


def claimed_differences(correct: dict[str, dict[str, list[str]]], seed: int, resamples: int = RESAMPLES) -> list[dict]:
    """Returns each of `CLAIMS` whose two models are in `correct` as {a, b, diff, low, high, resamples, seed,
    excludes_zero}: A − B in mean-over-tasks accuracy with its paired bootstrap 95% interval. The demonstration
    (ICL) models read each example's correctness as its mean over the demonstration draws."""
    out = []
    for a, b in CLAIMS:
        if a in correct and b in correct:
            vectors = [{task: decode_correct(s) for task, s in correct[m].items()} for m in (a, b)]
            out.append({"a": a, "b": b, **paired_bootstrap(*vectors, seed, resamples).to_dict()})
    return out


def eval_phase(p: RunContext, merge_key: str, record: dict, difficulty: dict, metadata: dict, multitask: dict) -> dict:
    """Test accuracy / macro-F1 of base, experts, uniform, evolved group and global merges, and the global merge
    with curriculum (and, for the ablation, random-order) demonstrations, each model's per-example correctness and
    the `CLAIMS`' bootstrap intervals; into eval/results.json."""
    out = inside(p.run_dir, "eval")
    key = config_hash([merge_key, demo_settings(p.demos), difficulty["order"], p.max_eval_examples, multitask,
                       RESAMPLES])
    if marker := p.done(out, key, ("results.json",)):
        p.skip("eval", marker)
        return json.loads((out / "results.json").read_text())
    started = time.time()
    search = p.search()
    trainer = p.trainer(None, quiet=True)
    merges = search.candidate_merges(record)
    models = {name: merges[name] for name in ("base", "uniform", "task_arithmetic") if name in merges}
    models.update({name: c for name, c in merges.items() if name.startswith("evolved_") and name != FINAL})
    models[FINAL] = merges[FINAL]

    def dm(specs, **kw):  # demonstrations come from the whole training set; only test prompts are encoded
        return p.datamodule(specs, max_train_examples=None, encode_splits=["test"], **kw)

    results: dict[str, dict] = {}
    draws: dict[str, list[dict]] = {}  # model -> per demonstration draw (one without) {task: {example id: correct}}
    plain = dm(p.specs)
    with search.cached_shifts():  # tangent experts: the test prompts' per-expert shifts serve every model below
        for name, c in models.items():
            results[name] = dict(search.evaluate(trainer, c, plain, split="test"))
            draws[name] = [search.correct["test"]]
        results["expert"], draws["expert"] = {}, [{}]
        for t, spec in enumerate(p.specs):
            onehot = torch.zeros_like(merges["base"])
            onehot[:, t] = 1.0
            results["expert"].update(search.evaluate(trainer, onehot, dm([spec]), split="test"))
            draws["expert"][0].update(search.correct["test"])
    for name, r in multitask.items():  # trained and tested by their own phases, same scorer and test sample
        results[name], draws[name] = r["test"], [r["correct"]]
    icl: dict[str, dict] = {}
    if p.demos.k > 0:  # the ablation: each order over `seeds` demonstration draws, its mean per task and the spread
        icl["none"] = {"per_seed": [sum(r["metric"] for r in results[FINAL].values()) / len(p.specs)]}
        for order in p.demos.orders:
            runs, draws[ICL_MODELS[order]] = [], []
            for i in range(p.demos.seeds):
                data = dm(p.specs, max_length=p.demos.max_length, demonstrations=p.demos.k, demo_order=order,
                          demo_scope=p.demos.scope, demo_fixed=p.demos.fixed, demo_select=p.demos.select,
                          demo_losses=str(p.run_dir / "weak"),
                          difficulty_file=str(p.run_dir / "difficulty" / "difficulty.json"), demo_seed=p.seed + i)
                runs.append(dict(search.evaluate(trainer, models[FINAL], data, split="test")))
                draws[ICL_MODELS[order]].append(search.correct["test"])
            results[ICL_MODELS[order]] = {t: {m: sum(r[t][m] for r in runs) / len(runs) for m in runs[0][t]}
                                          for t in runs[0]}
            icl[order] = {"per_seed": [sum(r[t]["metric"] for t in r) / len(r) for r in runs]}
        for r in icl.values():
            r["mean"] = sum(r["per_seed"]) / len(r["per_seed"])
            r["std"] = (sum((x - r["mean"]) ** 2 for x in r["per_seed"]) / len(r["per_seed"])) ** 0.5
    groups = {s.name: s.group for s in p.specs}
    correct = encode_correct(draws)
    summary = {"models": results, "means": {m: group_means(r, groups) for m, r in results.items()},
               "differences": claimed_differences(correct, p.seed),
               "majority": {t: metadata[t]["majority_test"] for t in groups}, "groups": groups,
               "metrics": {s.name: {"metric": s.metric, "kind": s.kind} for s in p.specs},
               "demonstrations": asdict(p.demos), "max_eval_examples": p.max_eval_examples, "icl": icl,
               "precision": p.precision.to_dict(), "correct": correct}
    write_json(out / "results.json", summary)
    if rank_zero_only.rank == 0:
        logger = p.tensorboard("eval")
        for step, m in enumerate(results):
            logger.experiment.add_scalar("eval/mean_metric", summary["means"][m]["overall"], step)
            for task, r in results[m].items():
                for name in ("metric", "acc", "f1"):
                    logger.experiment.add_scalar(f"eval/{m}/{task}/{name}", r[name], 0)
        for order, r in icl.items():  # one point per demonstration seed
            for i, acc in enumerate(r["per_seed"]):
                logger.experiment.add_scalar(f"eval/icl/{order}/mean_metric", acc, i)
        for d in summary["differences"]:
            for bound in ("diff", "low", "high"):
                logger.experiment.add_scalar(f"eval/differences/{d['a']}_vs_{d['b']}/{bound}", d[bound], 0)
        logger.finalize("success")
    p.finish("eval", out, key, started)
    return summary

"""The evaluation matrix of `memmcl pipeline`: every model of the roster on every task's test split, one scorer.

`ROSTER` names every evaluated model in the method's order with its label in the report; `group_means` is the one
definition of mean accuracy (overall and per group) used by the search summary, the pipeline and the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_only

from memmcl.datamodule import MultiTaskDataModule
from memmcl.rundir import config_hash, inside, write_json
from memmcl.settings import demo_settings

if TYPE_CHECKING:
    from memmcl.pipeline import Pipeline

# Model name in eval/results.json -> its label; `evolved_group` is composed by the report (each group's own merge on
# that group's tasks, from `evolved_<group>`).
ROSTER = {
    "base": "base (zero-shot)",
    "expert": "expert",
    "uniform": "uniform merge",
    "task_arithmetic": "task arithmetic (tuned λ)",
    "evolved_group": "evolved group merge",
    "evolved_global": "evolved global merge",
    "multitask": "multi-task LoRA",
    "multitask+curriculum": "multi-task LoRA + curriculum",
    "evolved_global+icl": "global + curriculum ICL",
    "evolved_global+icl_random": "global + random-order ICL",
    "evolved_global+icl_reverse": "global + reverse-order ICL",
}
ICL_MODELS = {"curriculum": "evolved_global+icl", "random": "evolved_global+icl_random",
              "reverse": "evolved_global+icl_reverse"}


def group_means(per_task: dict[str, dict], groups: dict[str, str]) -> dict[str, float]:
    """Returns mean accuracy overall and per group over the tasks present in `per_task`."""
    out = {"overall": sum(r["acc"] for r in per_task.values()) / len(per_task)}
    for g in dict.fromkeys(groups[t] for t in per_task):
        accs = [r["acc"] for t, r in per_task.items() if groups[t] == g]
        out[g] = sum(accs) / len(accs)
    return out


def eval_phase(p: Pipeline, merge_key: str, record: dict, difficulty: dict, metadata: dict, multitask: dict) -> dict:
    """Test accuracy / macro-F1 of base, experts, uniform, evolved group and global merges, and the global merge
    with curriculum (and, for the ablation, random-order) demonstrations; into eval/results.json."""
    out = inside(p.run_dir, "eval")
    key = config_hash([merge_key, demo_settings(p.demos), difficulty["order"], p.max_eval_examples, multitask])
    if marker := p._done(out, key, ("results.json",)):
        p._skip("eval", marker)
        return json.loads((out / "results.json").read_text())
    started = time.time()
    search = p.search()
    trainer = p._trainer(None, quiet=True)
    merges = search.candidate_merges(record)
    models = {name: merges[name] for name in ("base", "uniform", "task_arithmetic") if name in merges}
    models.update({name: c for name, c in merges.items() if name.startswith("evolved_") and name != "evolved_global"})
    models["evolved_global"] = merges["final"]

    def dm(specs, **kw):
        return MultiTaskDataModule(specs, backbone=p.backbone, max_length=kw.pop("max_length", p.max_length),
                                   eval_batch_size=p.eval_batch_size, seed=p.seed,
                                   max_eval_examples=p.max_eval_examples, **kw)

    results: dict[str, dict] = {}
    plain = dm(p.specs)
    with search.cached_shifts():  # tangent experts: the test prompts' per-expert shifts serve every model below
        for name, c in models.items():
            results[name] = dict(search.evaluate(trainer, c, plain, split="test"))
        results["expert"] = {}
        for t, spec in enumerate(p.specs):
            onehot = torch.zeros_like(merges["base"])
            onehot[:, t] = 1.0
            results["expert"].update(search.evaluate(trainer, onehot, dm([spec]), split="test"))
    results.update(multitask)  # trained and tested by their own phases, same scorer and test sample
    icl: dict[str, dict] = {}
    if p.demos.k > 0:  # the ablation: each order over `seeds` demonstration draws, its mean per task and the spread
        icl["none"] = {"per_seed": [sum(r["acc"] for r in results["evolved_global"].values()) / len(p.specs)]}
        for order in p.demos.orders:
            runs = []
            for i in range(p.demos.seeds):
                data = dm(p.specs, max_length=p.demos.max_length, demonstrations=p.demos.k, demo_order=order,
                          demo_scope=p.demos.scope, demo_fixed=p.demos.fixed, demo_select=p.demos.select,
                          demo_losses=str(p.run_dir / "weak"),
                          difficulty_file=str(p.run_dir / "difficulty" / "difficulty.json"), demo_seed=p.seed + i,
                          encode_splits=["test"])
                runs.append(dict(search.evaluate(trainer, models["evolved_global"], data, split="test")))
            results[ICL_MODELS[order]] = {t: {m: sum(r[t][m] for r in runs) / len(runs) for m in runs[0][t]}
                                          for t in runs[0]}
            icl[order] = {"per_seed": [sum(r[t]["acc"] for t in r) / len(r) for r in runs]}
        for r in icl.values():
            r["mean"] = sum(r["per_seed"]) / len(r["per_seed"])
            r["std"] = (sum((x - r["mean"]) ** 2 for x in r["per_seed"]) / len(r["per_seed"])) ** 0.5
    groups = {s.name: s.group for s in p.specs}
    summary = {"models": results, "means": {m: group_means(r, groups) for m, r in results.items()},
               "majority": {t: metadata[t]["majority_test"] for t in groups}, "groups": groups,
               "demonstrations": asdict(p.demos), "max_eval_examples": p.max_eval_examples, "icl": icl,
               "precision": p.precision.to_dict()}
    write_json(out / "results.json", summary)
    if rank_zero_only.rank == 0:
        logger = p._tensorboard("eval")
        for step, m in enumerate(results):
            logger.experiment.add_scalar("eval/mean_acc", summary["means"][m]["overall"], step)
            for task, r in results[m].items():
                logger.experiment.add_scalar(f"eval/{m}/{task}/acc", r["acc"], 0)
        for order, r in icl.items():  # one point per demonstration seed
            for i, acc in enumerate(r["per_seed"]):
                logger.experiment.add_scalar(f"eval/icl/{order}/mean_acc", acc, i)
        logger.finalize("success")
    p._finish("eval", out, key, started)
    return summary

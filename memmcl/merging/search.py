"""`MergeSearch`: evolutionary merging of LoRA experts (MEM), fitness from `Trainer.validate` on weak data.

Stages, as in the method:
1. inside each group (SC, ABSA, MAST), a genome weights that group's experts; fitness = mean accuracy on the
   group's weak data;
2. a genome weights the group merges; fitness = mean accuracy on the union of weak data.
Every stage's members are coefficient matrices over all experts, so the final model is still
base + Σ_t c_t ΔLoRA_t and exports like any genome. DEAP proposes genomes (CMA-ES, or a GA); each genome's fitness
is one `Trainer.validate` call on this module. Under DDP each rank scores a shard and torchmetrics reduces, so all
ranks see the same fitness and, with the same seed, the same genomes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

from memmcl.experts.expert import write_atomic
from memmcl.merging.multilora import MergeError, coefficients_to_yaml
from memmcl.merging.scorer import MergeScorer
from memmcl.merging.stage import quiet_progress_bar, run_stage, tune_task_arithmetic
from memmcl.merging.weak import mine_weak_data
from memmcl.roster import FINAL
from memmcl.rundir import clear, inside
from memmcl.tasks.spec import TaskSpec

log = logging.getLogger(__name__)
GENOME_FILE = "best_genome.yaml"


def genome_problem(record) -> str | None:
    """Returns what is wrong with the shape of a best_genome.yaml record (None when it is whole): `coefficients` and
    each stage's and baseline's map expert names to a weight or a list of per-block weights."""

    def weights(value) -> bool:
        return isinstance(value, dict) and all(
            isinstance(w, int | float) and not isinstance(w, bool)
            or isinstance(w, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in w)
            for w in value.values())

    if not isinstance(record, dict):
        return f"a {type(record).__name__}, expected a mapping"
    if not weights(record.get("coefficients")):
        return "field 'coefficients' is not a mapping of expert name -> weight(s)"
    for section in ("stages", "baselines"):
        entries = record.get(section, {})
        if not isinstance(entries, dict) or not all(isinstance(r, dict) and weights(r.get("coefficients"))
                                                    for r in entries.values()):
            return f"field '{section}' is not a mapping of name -> {{coefficients: expert name -> weight(s), ...}}"
    return None


def read_genome(path: Path) -> dict:
    """Returns a best_genome.yaml record; a file that is not plain YAML (a `!!python` tag) or not a genome's shape is
    an error naming the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise MergeError(f"{path}: not a plain YAML genome file ({str(err).splitlines()[0]})") from None
    if problem := genome_problem(data):
        raise MergeError(f"{path}: {problem}; expected a best_genome.yaml written by memmcl merge")
    return data


class MergeSearch(MergeScorer):
    """Evolutionary merge of saved LoRA experts (the search driver over `MergeScorer`): weak data → a search per
    group → a search over the group merges → record (best_genome.yaml) → export (merged/) → test evaluation. Run it
    with `memmcl merge --config configs/demo/merge.yaml`; its arguments are `MergeScorer`'s."""

    # ---- weak data ---------------------------------------------------------------------------------------------

    def mine_weak_data(self, trainer: L.Trainer) -> list[TaskSpec]:
        """Each expert's weak data and per-example losses (see `weak.mine_weak_data`); the weak specs in expert order."""
        return mine_weak_data(self, trainer)

    # ---- the whole merge ---------------------------------------------------------------------------------------

    def run(self, trainer: L.Trainer, resume: bool = False, genome: str | None = None) -> dict:
        """Weak data → a search per group → a search over the group merges → export (→ test evaluation)."""
        # One bar over generations replaces Lightning's per-call bars, if the trainer shows bars at all.
        self._show_progress = trainer.progress_bar_callback is not None and trainer.progress_bar_callback.is_enabled
        with quiet_progress_bar(trainer):
            return self._run(trainer, resume, genome)

    def _run(self, trainer: L.Trainer, resume: bool, genome: str | None) -> dict:
        if not resume and genome is None and trainer.is_global_zero:
            clear(self.out_dir, "stages")
        if genome is not None:
            coef, record = self.load_genome(genome)
        else:
            weak = self.mine_weak_data(trainer)
            with self.cached_shifts():
                coef, record = self._search(trainer, weak, resume)
        self.set_coefficients(coef)
        if trainer.is_global_zero:
            self.export(inside(self.out_dir, "merged"))
        trainer.strategy.barrier()
        if self.hparams.evaluate_test:
            record["test"] = self.evaluate_test(trainer, record)
        self.summary = record
        return record

    def _search(self, trainer: L.Trainer, weak: list[TaskSpec], resume: bool) -> tuple[torch.Tensor, dict]:
        """A search per group, then over the group merges, then the baselines; returns the final coefficients and the
        record written to best_genome.yaml."""
        T = self.model.n_experts
        stages = {}
        group_coef = {}
        for g, members in self.groups.items():
            basis = torch.zeros(len(members), self.hparams.blocks, T)
            for m, t in enumerate(members):
                basis[m, :, t] = 1.0
            stages[g] = run_stage(self, trainer, g, basis, [self.names[t] for t in members],
                                  [weak[t] for t in members], resume, self._show_progress)
            group_coef[g] = self.coef_matrix(stages[g]["coefficients"])
        if len(self.groups) > 1:
            basis = torch.stack([group_coef[g] for g in self.groups])
            stages["global"] = run_stage(self, trainer, "global", basis, list(self.groups), weak, resume,
                                          self._show_progress)
            final = stages["global"]
        else:
            final = stages[next(iter(self.groups))]
        coef = self.coef_matrix(final["coefficients"])
        baselines = {}
        if self.hparams.task_arithmetic_scales:
            baselines["task_arithmetic"] = tune_task_arithmetic(self, trainer, weak, list(self.hparams.task_arithmetic_scales))
        record = {
            "backbone": self.backbone,
            "experts": {n: str(p.resolve()) for n, p in zip(self.names, self.expert_dirs, strict=True)},
            "blocks": self.hparams.blocks,
            "method": self.hparams.method,
            "density": self.hparams.density,
            **self.kind.record(),
            "groups": {g: [self.names[t] for t in m] for g, m in self.groups.items()},
            "stages": {s: {k: r[k] for k in ("members", "genome", "fitness", "uniform_fitness", "coefficients")}
                       for s, r in stages.items()},
            "coefficients": coefficients_to_yaml(coef, self.names),
            "baselines": baselines,
        }
        if trainer.is_global_zero:
            write_atomic(inside(self.out_dir, GENOME_FILE), yaml.safe_dump(record, sort_keys=False).encode())
        return coef, record

    def load_genome(self, path: str | Path) -> tuple[torch.Tensor, dict]:
        """Returns the [blocks, T] coefficients of a `best_genome.yaml`, checked against these experts, and the file's record."""
        path = Path(path)
        if not path.is_file():
            raise MergeError(f"{path}: no such genome file; expected a best_genome.yaml written by memmcl merge")
        data = read_genome(path)
        return self.coef_matrix(data.get("coefficients"), source=str(path)), data

    def evaluate_test(self, trainer: L.Trainer, record: dict) -> dict:
        """Test-split accuracy of base, uniform, each stage's merge and the final merge (reporting only: never fitness)."""
        dm = self.datamodule(list(self.expert_specs))
        candidates = self.candidate_merges(record)
        out = {}
        for name, coef in candidates.items():
            with self.cached_shifts():
                res = self.evaluate(trainer, coef, dm, split="test")
            out[name] = {"mean_acc": float(np.mean([r["acc"] for r in res.values()])), "per_task": res}
        for g, members in self.groups.items():
            tasks = [self.names[t] for t in members]
            for name in out:
                out[name][f"mean_acc_{g}"] = float(np.mean([out[name]["per_task"][t]["acc"] for t in tasks]))
        self.set_coefficients(candidates[FINAL])
        if trainer.is_global_zero:
            write_atomic(inside(self.out_dir, "test_eval.yaml"), yaml.safe_dump(out, sort_keys=False).encode())
        return out

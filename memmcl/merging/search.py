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

import contextlib
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import yaml

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.backbone import Dtype, load_backbone
from memmcl.experts.expert import (
    EXPERT_FILE,
    LabelScoringModule,
    check_expert_dir,
    write_atomic,
)
from memmcl.merging import evolution
from memmcl.merging.methods import MergeMethod, method_info
from memmcl.merging.multilora import (
    MergeError,
    MultiLoRAModel,
    coefficients_from_yaml,
    coefficients_to_yaml,
    read_lora_factors,
)
from memmcl.merging.stage import quiet_progress_bar, run_stage, tune_task_arithmetic
from memmcl.merging.tangent import TangentScorer
from memmcl.merging.weak import mine_weak_data
from memmcl.rundir import atomic_save_dir, clear, inside
from memmcl.tasks.spec import GROUPS, TaskSpec, spec_from_dict

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


class MergeSearch(LabelScoringModule):
    """Evolutionary merge of saved LoRA experts. Run it with `memmcl merge --config configs/demo/merge.yaml`.

    Args:
        experts: expert directories (written by `LoRAExpert`); each expert's name is its task's.
        out_dir: where weak data, stage states and results go.
        backbone: the base model (default: the one recorded in the experts).
        algorithm: `cmaes` (DEAP CMA-ES), `ga` (DEAP genetic algorithm) or `nsga2` (DEAP NSGA-II, one objective
            per group, or per task in a group's own stage; the stage returns the knee of its Pareto front).
        population, generations, sigma, seed: the search budget and its randomness.
        bounds: each genome value is clipped to [low, high] before it is evaluated.
        blocks: layer blocks per member (1: one weight per member; n: one per member and block of layers).
        method: how expert deltas combine (`linear` is exact rescaling; `ties`/`dare_*` fold materialized deltas).
        density: TIES / DARE density.
        fold: write each linear genome into the weights (fitness then runs at base-model speed); float32 weights
            only: bfloat16 weights cannot hold a LoRA delta's low bits (W0 + ΔW rounds ΔW to W0's bf16 spacing), so
            a bf16 backbone scores linear merges unfolded, the delta applied to the activations.
        task_weights: fitness = Σ w_task · acc_task / Σ w_task (default 1 per task).
        fitness: `mean` (the weighted mean above) or `protect`: (mean + worst_weight · worst unit) / (1 +
            worst_weight), the units being the global stage's groups or a group stage's tasks (see `merging.stage`).
        worst_weight: the weight of the worst unit under `fitness: protect`.
        groups: override the expert → group assignment (`{SC: [sc_binary, ...], ...}`).
        max_weak_examples: cap per task (seeded sample) to bound fitness cost.
        min_weak_examples: weak data below this size is topped up with the expert's lowest-margin correct
            training examples (a fitted expert gets almost all of its training data right).
        on_test_overlap: `error` (default) or `drop` weak examples whose content equals a test example's.
        evaluate_test: after the search, score base / uniform / group / global merges on the test splits.
        weak_dir: where weak data goes (default `<out_dir>/weak`).
        weak_anchor_ratio: add this many correctly predicted training examples per weak example (0: the method as
            published, mistakes only; see `select_weak`).
        max_train_examples: the experts' training cap (`expert.max_train_examples`): weak data comes from the same
            seeded, label-stratified sample each expert was trained on, not from the whole training split.
        task_arithmetic_scales: the baseline base + λ Σ_t ΔLoRA_t is tuned over these λ on weak data (null or []:
            no baseline); it is scored beside the evolved merges.
    """

    log_eval_to_logger = False

    def __init__(
        self,
        experts: list[str],
        out_dir: str = "runs/merge",
        backbone: str | None = None,
        dtype: Dtype = "float32",
        algorithm: evolution.Algorithm = "cmaes",
        population: int = 8,
        generations: int = 10,
        sigma: float = 0.3,
        bounds: tuple[float, float] = (0.0, 2.0),
        blocks: int = 1,
        seed: int = 0,
        method: MergeMethod = "linear",
        density: float = 0.5,
        fold: bool = True,
        task_weights: dict[str, float] | None = None,
        fitness: Literal["mean", "protect"] = "mean",
        worst_weight: float = 1.0,
        groups: dict[str, list[str]] | None = None,
        max_length: int = 256,
        eval_batch_size: int = 32,
        max_weak_examples: int | None = None,
        min_weak_examples: int = 32,
        on_test_overlap: Literal["error", "drop"] = "error",
        evaluate_test: bool = True,
        weak_dir: str | None = None,
        weak_anchor_ratio: float = 0.0,
        max_train_examples: int | None = None,
        task_arithmetic_scales: tuple[float, ...] | None = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    ):
        super().__init__()
        self.save_hyperparameters()
        if not experts:
            raise MergeError("model.init_args.experts is empty; expected expert directories")
        if population < 2 or generations < 1:
            raise MergeError(f"population={population}, generations={generations}: expected population >= 2, generations >= 1")
        if worst_weight < 0:
            raise MergeError(f"worst_weight={worst_weight}: expected a weight >= 0")
        self.expert_dirs = [Path(p) for p in experts]
        self.expert_specs: list[TaskSpec] = []
        backbones, tangent = set(), set()
        for path in self.expert_dirs:
            meta = check_expert_dir(path)
            tangent.add(bool(meta.get("tangent")))
            tasks = [spec_from_dict(d, source=f"{path}/{EXPERT_FILE}") for d in meta["tasks"]]
            if len(tasks) != 1:
                raise MergeError(f"{path}: an expert for {len(tasks)} tasks; MergeSearch merges single-task experts")
            self.expert_specs.append(tasks[0])
            backbones.add(meta["backbone"])
        if backbone is None and len(backbones) > 1:
            raise MergeError(f"experts were trained on different backbones {sorted(backbones)}; set model.init_args.backbone")
        self.backbone = backbone or backbones.pop()
        self.names = [s.name for s in self.expert_specs]
        if len(set(self.names)) != len(self.names):
            raise MergeError(f"two experts are for the same task: {self.names}")
        self.groups = self._group_members(groups)
        self.task_group = {self.names[t]: g for g, members in self.groups.items() for t in members}
        if len(tangent) > 1:
            raise MergeError(f"experts {[str(p) for p in self.expert_dirs]}: tangent and ordinary LoRA experts mixed "
                             "(expert.yaml: tangent); expected one kind")
        self.tangent = tangent.pop()
        if self.tangent and method != "linear":
            raise MergeError(f"method={method!r}: tangent experts merge linearly only; expected 'linear'")
        base, self.tokenizer = load_backbone(self.backbone, dtype)
        self.pad_id = self.tokenizer.pad_token_id
        self.fold_exact = base.dtype == torch.float32
        self.model = MultiLoRAModel(base, [read_lora_factors(p, n) for p, n in zip(self.expert_dirs, self.names, strict=True)], blocks)
        self.tangent_scorer = TangentScorer(self.model, self.pad_id, max(s.n_classes for s in self.expert_specs)) \
            if self.tangent else None
        self.out_dir = Path(out_dir)
        self.weak_dir = Path(weak_dir) if weak_dir is not None else self.out_dir / "weak"
        self.strict_loading = False

    def _group_members(self, groups: dict[str, list[str]] | None) -> dict[str, list[int]]:
        if groups is None:
            out = {g: [t for t, s in enumerate(self.expert_specs) if s.group == g] for g in GROUPS}
            return {g: m for g, m in out.items() if m}
        out = {}
        for g, names in groups.items():
            unknown = set(names) - set(self.names)
            if unknown:
                raise MergeError(f"model.init_args.groups.{g} names unknown expert(s) {sorted(unknown)}; experts: {self.names}")
            out[g] = [self.names.index(n) for n in names]
        return out

    @property
    def generates(self) -> bool:
        """Tangent experts are scored in the tangent model, per label: no extraction task (`LabelScoringModule.setup`)."""
        return self.tangent_scorer is None

    def state_dict(self, *args, **kwargs):  # nothing to checkpoint: experts are files, the search state is its own
        return {}

    # ---- fitness -----------------------------------------------------------------------------------------------

    def datamodule(self, specs: list[TaskSpec], predict_split: str = "validation") -> MultiTaskDataModule:
        h = self.hparams
        batch_size = max(h.eval_batch_size, TangentScorer.batch_size) if self.tangent else h.eval_batch_size
        return MultiTaskDataModule(specs, backbone=self.backbone, max_length=h.max_length, seed=h.seed,
                                   eval_batch_size=batch_size, predict_split=predict_split,
                                   max_train_examples=h.max_train_examples)

    def set_coefficients(self, coef: torch.Tensor) -> None:
        h = self.hparams
        fold = h.fold and not self.tangent and self.fold_exact
        self.model.set_genome(coef, fold=fold, method=h.method, density=h.density, seed=h.seed)

    def predict_scores(self, batch: dict) -> torch.Tensor:
        """The label scorer; for tangent experts, in the tangent model (`TangentScorer`)."""
        if self.tangent_scorer is None:
            return super().predict_scores(batch)
        return self.tangent_scorer.scores(batch["prompt"], batch["answers"]).to(self.device)

    def cached_shifts(self) -> contextlib.AbstractContextManager:
        """Within: tangent experts' scores come from per-expert shifts kept per prompt (data scored under many
        genomes: weak data, the test split); a no-op for LoRA experts."""
        return self.tangent_scorer.cached() if self.tangent_scorer is not None else contextlib.nullcontext()

    def evaluate(self, trainer: L.Trainer, coef: torch.Tensor, datamodule: MultiTaskDataModule, split: str = "val") -> dict:
        """Returns per-task {acc, f1} of the merge `coef` on the datamodule's validation (or test) split; each
        test example's correctness is then in `self.correct["test"]`."""
        self.set_coefficients(coef)
        if split == "val":
            trainer.validate(self, datamodule=datamodule, verbose=False)
        else:
            trainer.test(self, datamodule=datamodule, verbose=False)
        return self.results[split]

    # ---- weak data ---------------------------------------------------------------------------------------------

    def mine_weak_data(self, trainer: L.Trainer) -> list[TaskSpec]:
        """Each expert's weak data and per-example losses (see `weak.mine_weak_data`); the weak specs in expert order."""
        return mine_weak_data(self, trainer)

    # ---- the search --------------------------------------------------------------------------------------------

    def _coef_matrix(self, coefficients, source: str = "<memory>") -> torch.Tensor:
        return coefficients_from_yaml(coefficients, self.names, self.hparams.blocks, source)

    def _after_generation(self, stage: str, generation: int) -> None:
        """Hook after each generation's state is saved (tests stop a search here to check resume)."""

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
            group_coef[g] = self._coef_matrix(stages[g]["coefficients"])
        if len(self.groups) > 1:
            basis = torch.stack([group_coef[g] for g in self.groups])
            stages["global"] = run_stage(self, trainer, "global", basis, list(self.groups), weak, resume,
                                          self._show_progress)
            final = stages["global"]
        else:
            final = stages[next(iter(self.groups))]
        coef = self._coef_matrix(final["coefficients"])
        baselines = {}
        if self.hparams.task_arithmetic_scales:
            baselines["task_arithmetic"] = tune_task_arithmetic(self, trainer, weak, list(self.hparams.task_arithmetic_scales))
        record = {
            "backbone": self.backbone,
            "experts": {n: str(p.resolve()) for n, p in zip(self.names, self.expert_dirs, strict=True)},
            "blocks": self.hparams.blocks,
            "method": self.hparams.method,
            "density": self.hparams.density,
            **({"tangent": True} if self.tangent else {}),
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
        return self._coef_matrix(data.get("coefficients"), source=str(path)), data

    def export(self, out_dir: Path) -> Path:
        """Writes the current merge: a peft adapter loadable as an expert (linear), else a full HF model. A merge of
        tangent experts is marked `tangent` in its expert.yaml: its model is the tangent model, not the adapter."""
        meta = {"backbone": self.backbone, "tasks": [s.to_dict() for s in self.expert_specs],
                **({"tangent": True} if self.tangent else {})}

        def write(tmp: Path) -> None:
            if method_info(self.hparams.method).low_rank_export:
                self.model.save_adapter(tmp, base_name_or_path=self.backbone)
                (tmp / EXPERT_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
            else:
                self.model.save_model(tmp, self.tokenizer)

        atomic_save_dir(out_dir, write, replace=True)
        return out_dir

    def candidate_merges(self, record: dict) -> dict[str, torch.Tensor]:
        """Returns the coefficient matrices to score after a search `record` (best_genome): `base` (no expert),
        `uniform` (1/T each), `uniform_<group>`, `evolved_<stage>` for each stage, each baseline (`task_arithmetic`)
        and `final` (the record's own)."""
        T = self.model.n_experts
        candidates = {"base": torch.zeros(self.hparams.blocks, T),
                      "uniform": torch.full((self.hparams.blocks, T), 1.0 / T)}
        for g, members in self.groups.items():
            u = torch.zeros(self.hparams.blocks, T)
            u[:, members] = 1.0 / len(members)
            candidates[f"uniform_{g}"] = u
        for stage, r in record.get("stages", {}).items():
            candidates[f"evolved_{stage}"] = self._coef_matrix(r["coefficients"])
        for name, r in record.get("baselines", {}).items():
            candidates[name] = self._coef_matrix(r["coefficients"])
        candidates["final"] = self._coef_matrix(record["coefficients"])
        return candidates

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
        self.set_coefficients(candidates["final"])
        if trainer.is_global_zero:
            write_atomic(inside(self.out_dir, "test_eval.yaml"), yaml.safe_dump(out, sort_keys=False).encode())
        return out

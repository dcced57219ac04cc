"""`MergeScorer`: the scoring LightningModule of the evolutionary merge: every expert's LoRA factors over one frozen
backbone (`MultiLoRAModel`), a genome switched in microseconds (`set_coefficients`), and the task metric of a merge
on a datamodule through `Trainer.validate` / `Trainer.test` (`evaluate`).

This is the small public interface the merge's parts talk to: the stage runner (`merging.stage`) and the weak-data
miner (`merging.weak`) read `names`, `expert_specs`, `expert_dirs`, `groups`, `task_group`, `hparams`, `model`,
`out_dir`, `weak_dir` and call `datamodule`, `set_coefficients`, `evaluate`, `coef_matrix`, `after_generation`; the
search driver is `merging.search.MergeSearch`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import yaml

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.backbone import Dtype, load_backbone
from memmcl.experts.expert import EXPERT_FILE, LabelScoringModule, check_expert_dir
from memmcl.experts.kinds import ExpertKind, kind_of
from memmcl.merging import evolution
from memmcl.merging.methods import MergeMethod, method_info
from memmcl.merging.multilora import MergeError, MultiLoRAModel, coefficients_from_yaml, read_lora_factors
from memmcl.roster import FINAL
from memmcl.rundir import atomic_save_dir
from memmcl.tasks.spec import GROUPS, TaskSpec, spec_from_dict

log = logging.getLogger(__name__)


def _class(path: str) -> type:
    """The class at a dotted path (an expert kind's merge scorer, `memmcl.experts.kinds`)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class MergeScorer(LabelScoringModule):
    """Saved LoRA experts merged by a genome, scored with the task metric (the search driver: `MergeSearch`).

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
        backbones, kinds = set(), {}
        for path in self.expert_dirs:
            meta = check_expert_dir(path)
            kind = kind_of(meta, f"{path}/{EXPERT_FILE}")
            kinds[kind.name] = kind
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
        if len(kinds) > 1:
            raise MergeError(f"experts {[str(p) for p in self.expert_dirs]}: kinds {sorted(kinds)} mixed "
                             "(expert.yaml: kind); expected one kind")
        self.kind: ExpertKind = kinds.popitem()[1]
        if self.kind.merge_methods is not None and method not in self.kind.merge_methods:
            raise MergeError(f"method={method!r}: {self.kind.name} experts merge by {list(self.kind.merge_methods)} only")
        base, self.tokenizer = load_backbone(self.backbone, dtype)
        self.pad_id = self.tokenizer.pad_token_id
        self.fold_exact = base.dtype == torch.float32
        self.model = MultiLoRAModel(base, [read_lora_factors(p, n) for p, n in zip(self.expert_dirs, self.names, strict=True)], blocks)
        # a kind whose merges are scored in their own model (tangent: the first-order expansion) names its scorer
        self.kind_scorer = None if self.kind.merge_scorer is None else _class(self.kind.merge_scorer)(
            self.model, self.pad_id, max(s.n_classes for s in self.expert_specs))
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
        """Experts of a kind with its own scorer (tangent) score labels: no extraction task (`LabelScoringModule.setup`)."""
        return self.kind_scorer is None and self.kind.generates

    def state_dict(self, *args, **kwargs):  # nothing to checkpoint: experts are files, the search state is its own
        return {}

    # ---- fitness -----------------------------------------------------------------------------------------------

    def datamodule(self, specs: list[TaskSpec], predict_split: str = "validation") -> MultiTaskDataModule:
        h = self.hparams
        batch_size = max(h.eval_batch_size, self.kind_scorer.batch_size) if self.kind_scorer else h.eval_batch_size
        return MultiTaskDataModule(specs, backbone=self.backbone, max_length=h.max_length, seed=h.seed,
                                   eval_batch_size=batch_size, predict_split=predict_split,
                                   max_train_examples=h.max_train_examples)

    def set_coefficients(self, coef: torch.Tensor) -> None:
        h = self.hparams
        fold = h.fold and self.kind_scorer is None and self.fold_exact
        self.model.set_genome(coef, fold=fold, method=h.method, density=h.density, seed=h.seed)

    def predict_scores(self, batch: dict) -> torch.Tensor:
        """The label scorer; for a kind with its own scorer (tangent: `TangentScorer`), that scorer's."""
        if self.kind_scorer is None:
            return super().predict_scores(batch)
        return self.kind_scorer.scores(batch["prompt"], batch["answers"]).to(self.device)

    def cached_shifts(self) -> contextlib.AbstractContextManager:
        """Within: tangent experts' scores come from per-expert shifts kept per prompt (data scored under many
        genomes: weak data, the test split); a no-op for LoRA experts."""
        return self.kind_scorer.cached() if self.kind_scorer is not None else contextlib.nullcontext()

    def evaluate(self, trainer: L.Trainer, coef: torch.Tensor, datamodule: MultiTaskDataModule, split: str = "val") -> dict:
        """Returns per-task {acc, f1} of the merge `coef` on the datamodule's validation (or test) split; each
        test example's correctness is then in `self.correct["test"]`."""
        self.set_coefficients(coef)
        if split == "val":
            trainer.validate(self, datamodule=datamodule, verbose=False)
        else:
            trainer.test(self, datamodule=datamodule, verbose=False)
        return self.results[split]

    # ---- genomes -----------------------------------------------------------------------------------------------

    def coef_matrix(self, coefficients, source: str = "<memory>") -> torch.Tensor:
        return coefficients_from_yaml(coefficients, self.names, self.hparams.blocks, source)

    def after_generation(self, stage: str, generation: int) -> None:
        """Hook after each generation's state is saved (tests stop a search here to check resume)."""

    def export(self, out_dir: Path) -> Path:
        """Writes the current merge: a peft adapter loadable as an expert (linear), else a full HF model. A merge of
        non-LoRA experts records their kind in its expert.yaml (tangent: its model is the tangent model, not the
        adapter)."""
        meta = {"backbone": self.backbone, "tasks": [s.to_dict() for s in self.expert_specs], **self.kind.record()}

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
        and `evolved_global` (`roster.FINAL`: the record's own coefficients, the global stage's or, with one group,
        that group's)."""
        T = self.model.n_experts
        candidates = {"base": torch.zeros(self.hparams.blocks, T),
                      "uniform": torch.full((self.hparams.blocks, T), 1.0 / T)}
        for g, members in self.groups.items():
            u = torch.zeros(self.hparams.blocks, T)
            u[:, members] = 1.0 / len(members)
            candidates[f"uniform_{g}"] = u
        for stage, r in record.get("stages", {}).items():
            candidates[f"evolved_{stage}"] = self.coef_matrix(r["coefficients"])
        for name, r in record.get("baselines", {}).items():
            candidates[name] = self.coef_matrix(r["coefficients"])
        candidates[FINAL] = self.coef_matrix(record["coefficients"])  # the record's own: the method's final model
        return candidates

"""`memmcl pipeline`: the whole method over one run directory, phase by phase, each skipped when already done.

    runs/<name>/
      config.yaml                 the configuration of the latest run
      data/metadata.json          per-task difficulty metadata
      experts/<task>/expert/      LoRA expert (peft adapter + expert.yaml) and metrics.json
      weak/                       weak data and per-example expert losses (MergeSearch.mine_weak_data)
      difficulty/                 difficulty.json (order easy -> hard, scores, features) and difficulty.md
      merge/                      best_genome.yaml, stages/<stage>/, merged/ (MergeSearch)
      eval/results.json           test accuracy / macro-F1 of every model on every task
      report/                     report.md and PNG plots (memmcl report)
      tensorboard/                experts/<task>, merge, difficulty, eval

A phase is done when its folder holds `.phase.json` with the hash of everything the phase depends on (its own
settings and its inputs' hashes). A re-run skips done phases, so a killed run resumes at the phase it was in (a merge
search resumes at its last finished generation); a changed setting re-runs that phase and the ones that depend on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from memmcl.baselines import multitask_phases
from memmcl.curriculum.difficulty import difficulty_scores, format_difficulty_table, task_features
from memmcl.evaluation import eval_phase
from memmcl.expert_phase import EXPERT_OUTPUTS, expert_done, expert_key, expert_phase  # noqa: F401
from memmcl.experts.backbone import BACKBONES, Dtype, resolve_backbone
from memmcl.experts.expert import write_atomic
from memmcl.experts.kinds import expert_kind
from memmcl.merging.multilora import ADAPTER_WEIGHTS
from memmcl.merging.search import GENOME_FILE, genome_problem
from memmcl.merging.weak import check_task_data, mine_weak_data, summary_problem
from memmcl.precision import resolve_precision
from memmcl.run import PHASE_FILE, RunContext  # noqa: F401  (PHASE_FILE re-exported)
from memmcl.rundir import (  # noqa: F401  (config_hash re-exported)
    RunLock,
    added_setting,
    clear,
    config_hash,
    file_problem,
    file_sha,
    inside,
    sweep_temporaries,
    write_json,
)
from memmcl.settings import (  # noqa: F401  (re-exported: the pipeline's settings)
    DemoConfig,
    ExpertConfig,
    MergeConfig,
    MultitaskConfig,
    PipelineError,
    TrainerConfig,
    check_pipeline_settings,
    resolve_expert,
)
from memmcl.tasks.spec import embedded_task_names, load_task_specs
from memmcl.workers import run_in_workers, worker_threads

log = logging.getLogger(__name__)




class Pipeline(RunContext):
    """MEM-MCL end to end: experts → weak data → difficulty → group merges → global merge → evaluation → report.

    Args:
        name: the run directory is `<root>/<name>`.
        backbone: registered name (`tiny`), local HF model directory, or hub name already in the local cache.
        dtype: the frozen backbone's weights; null: as `trainer.precision` resolves (`memmcl.precision`: bf16-mixed
            with bfloat16 weights where the CPU has native bf16, else float32).
        tasks: shipped task names or task spec YAML paths (default: every shipped task).
        max_length: prompt + answer tokens for training and zero-shot evaluation.
        max_eval_examples: score only the first N validation / test examples of each task (slow CPU runs; the
            report then says so).
        difficulty_weights: feature weights of the task difficulty score (default `DEFAULT_WEIGHTS`).
        data_dir: the data folder of task specs whose split paths start with `data:` (`configs/real/`); default
            $MEMMCL_DATA_DIR, else ../shared/realdata where it exists.
        multitask: multi-task LoRA baselines, with and without the CurriculumSampler (`memmcl.baselines`).
    """

    def __init__(
        self,
        name: str = "demo",
        root: str = "runs",
        backbone: str = "tiny",
        dtype: Dtype | None = None,
        tasks: list[str] | None = None,
        seed: int = 0,
        max_length: int = 128,
        eval_batch_size: int = 32,
        max_eval_examples: int | None = None,
        expert: ExpertConfig | None = None,
        merge: MergeConfig | None = None,
        difficulty_weights: dict[str, float] | None = None,
        demonstrations: DemoConfig | None = None,
        trainer: TrainerConfig | None = None,
        data_dir: str | None = None,
        multitask: MultitaskConfig | None = None,
    ):
        expert, trainer = resolve_expert(expert or ExpertConfig()), trainer or TrainerConfig()
        kind = expert_kind(expert.kind)
        try:
            precision = resolve_precision(trainer.precision, trainer.accelerator, dtype,
                                          float32_only=kind.name if kind.float32_only else None)
        except ValueError as err:
            raise PipelineError(str(err)) from None
        if tasks is not None and not tasks:
            raise PipelineError("tasks: expected at least one shipped task name or task spec path, got [] "
                                "(leave tasks out for every shipped task)")
        specs = load_task_specs(list(embedded_task_names() if tasks is None else tasks), data_dir)
        super().__init__(Path(root) / name, specs, backbone, precision, seed, max_length, eval_batch_size,
                         max_eval_examples, expert, merge, demonstrations, multitask, trainer)
        self.name, self.difficulty_weights = name, difficulty_weights
        self.check_settings()

    def check_settings(self) -> None:
        """Checks every setting that a later phase would reject, so a bad one fails before any expert is trained."""
        check_pipeline_settings(self.max_length, self.eval_batch_size, self.max_eval_examples, self.expert, self.merge,
                                self.demos, self.difficulty_weights, [s.name for s in self.specs], self.multitask)
        generated = [s for s in self.specs if s.task_kind.generates]
        if not expert_kind(self.expert.kind).generates and generated:
            raise PipelineError(f"expert.kind: {self.expert.kind} experts score labels; {generated[0].kind} task(s) "
                                f"{[s.name for s in generated]} are generated; expected another expert kind or "
                                "classification tasks only")
        try:  # the accelerator, devices and strategy are checked by building a Trainer (nothing is launched)
            self.trainer(None, quiet=True)
        except (MisconfigurationException, ValueError, RuntimeError) as err:
            t = self.trainer_config
            raise PipelineError(f"trainer: accelerator={t.accelerator!r}, devices={t.devices!r}, strategy={t.strategy!r}: "
                                f"{str(err).splitlines()[0]}") from None
        if self.backbone not in BACKBONES:  # a local directory must exist now (registered ones are built when used)
            try:
                resolve_backbone(self.backbone)
            except ValueError as err:
                raise PipelineError(f"backbone: {err}") from None

    # ---- phases --------------------------------------------------------------------------------------------------

    def data_phase(self) -> dict:
        """Per-task metadata (class counts, label entropy, input length, lexical diversity) into data/metadata.json."""
        out = inside(self.run_dir, "data")
        # the evaluation cap, the data check's setting, the seed of the experts' training sample (`added_setting`)
        capped = [*added_setting(self.max_eval_examples, None), *added_setting(self.merge.on_test_overlap, "error"),
                  *added_setting(self.seed, 0, "seed")]
        key = config_hash([self.backbone, self.max_length, self.expert.max_train_examples, *capped,
                           [(s.to_dict(), s.data_hash(("train", "validation", "test"))) for s in self.specs]])
        if marker := self.done(out, key, ("metadata.json",)):
            self.skip("data", marker)
            return json.loads((out / "metadata.json").read_text())
        started = time.time()
        dm = self.datamodule(self.specs)
        dm.setup()
        for spec in self.specs:  # what later phases need from the data, before the first expert is trained
            check_task_data(spec, dm.examples[spec.name], self.merge.on_test_overlap)
        metadata = {name: m.to_dict() for name, m in dm.metadata.items()}
        for spec in self.specs:  # the most frequent answer (extraction: `none` everywhere, exact sets)
            labels = Counter(spec.task_kind.majority_key(spec, e) for e in dm.examples[spec.name]["test"])
            metadata[spec.name]["majority_test"] = max(labels.values()) / sum(labels.values())
        write_json(out / "metadata.json", metadata)
        self.finish("data", out, key, started)
        return metadata

    def weak_phase(self, expert_keys: dict[str, str]) -> dict:
        """Each expert's weak data (mistakes on its own training split, topped up) into weak/; returns the summary."""
        out = inside(self.run_dir, "weak")
        key = config_hash([expert_keys, self.seed, self.merge.max_weak_examples, self.merge.min_weak_examples,
                           self.merge.weak_anchor_ratio, self.expert.max_train_examples])
        outputs = ("summary.yaml", *(f"{s.name}{suffix}" for s in self.specs for suffix in (".jsonl", ".example_loss.json")))
        names = [s.name for s in self.specs]
        if marker := self.done(out, key, outputs, {"summary.yaml": lambda summary: summary_problem(summary, names)}):
            self.skip("weak", marker)
        else:
            started = time.time()
            mine_weak_data(self.search(), self.trainer(None, quiet=True), progress=self.trainer_config.progress_bar)
            self.finish("weak", out, key, started)
        return yaml.safe_load((out / "summary.yaml").read_text())

    def difficulty_phase(self, metadata: dict, expert_metrics: dict, weak: dict) -> dict:
        """Scores task difficulty from metadata + expert error + weak-data rate into difficulty/; returns it."""
        out = inside(self.run_dir, "difficulty")
        features = {s.name: task_features(metadata[s.name], expert_metrics[s.name]["acc"],
                                          weak[s.name]["wrong"] / weak[s.name]["train"]) for s in self.specs}
        key = config_hash([features, self.difficulty_weights])
        if marker := self.done(out, key, ("difficulty.json",)):
            self.skip("difficulty", marker)
            return json.loads((out / "difficulty.json").read_text())
        started = time.time()
        difficulty = difficulty_scores(features, self.difficulty_weights)
        record = {**difficulty.to_dict(), "features": features, "groups": {s.name: s.group for s in self.specs}}
        write_json(out / "difficulty.json", record)
        if rank_zero_only.rank == 0:
            table = format_difficulty_table(difficulty, record["groups"])
            write_atomic(out / "difficulty.md", (table + "\n").encode())
            logger = self.tensorboard("difficulty")
            for rank, task in enumerate(difficulty.order()):
                logger.experiment.add_scalar(f"difficulty/{task}", difficulty.scores[task], rank)
            logger.experiment.add_text("difficulty/order", table)
            logger.finalize("success")
        self.finish("difficulty", out, key, started)
        return record

    def merge_phase(self, expert_keys: dict[str, str]) -> tuple[str, dict]:
        """Group searches, then the global search, into merge/; returns (key, best_genome record)."""
        out = inside(self.run_dir, "merge")
        key = config_hash([expert_keys, asdict(self.merge), self.seed, self.max_length])
        if marker := self.done(out, key, (GENOME_FILE,), {GENOME_FILE: genome_problem}):
            self.skip("merge", marker)
            return key, yaml.safe_load((out / GENOME_FILE).read_text())
        started = time.time()
        started_file = out / ".started.json"
        resume = started_file.exists() and json.loads(started_file.read_text()).get("key") == key
        write_json(started_file, {"key": key})
        trainer = self.trainer("merge")
        record = self.search().run(trainer, resume=resume)
        self.finish("merge", out, key, started, resumed=resume,
                     fitness={s: r["fitness"] for s, r in record["stages"].items()})
        return key, record


    # ---- the whole run -------------------------------------------------------------------------------------------

    def run(self, on_data_checked=None) -> dict:
        """Runs every phase not already done, holding the run directory's lock (rank 0; one run per directory);
        `on_data_checked()` runs under the lock once the data phase has read and checked every task's data (the CLI
        writes config.yaml there, so a run that fails on its data leaves the last good config). Writes
        eval/results.json and report/; returns the results."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext()
        with lock:
            if rank_zero_only.rank == 0:
                for path in sweep_temporaries(self.run_dir):
                    log.warning("%s: left by a killed run, removed", path)
            return self._run_phases(on_data_checked)

    def _run_phases(self, on_data_checked=None) -> dict:
        started = time.time()
        metadata = self.data_phase()
        if on_data_checked is not None:
            on_data_checked()
        keys = {s.name: expert_key(self, s) for s in self.specs}  # (each hashes its task's data files: once)
        run_in_workers(self, [(f"expert:{s.name}", expert_phase, (s, keys[s.name])) for s in self.specs
                         if not expert_done(self, s, keys[s.name])], total=len(self.specs))
        with worker_threads(self, total=len(self.specs)):
            expert_metrics = {s.name: expert_phase(self, s, keys[s.name]) for s in self.specs}
        if self.kind.release is not None:  # what the kind kept for training (tangent: Jacobians) is not needed now
            self.kind.release()
        # what the later phases consumed: each expert's settings and the adapter file it wrote (a replaced or
        # retrained adapter re-runs weak data, difficulty, merge and evaluation)
        expert_keys = {s.name: [keys[s.name], file_sha(self.run_dir / "experts" / s.name / "expert" / ADAPTER_WEIGHTS)]
                       for s in self.specs}
        weak = self.weak_phase(expert_keys)
        difficulty = self.difficulty_phase(metadata, expert_metrics, weak)
        multitask = multitask_phases(self, difficulty)
        merge_key, record = self.merge_phase(expert_keys)
        results = eval_phase(self, merge_key, record, difficulty, metadata, multitask)
        if rank_zero_only.rank == 0:
            write_json(inside(self.run_dir, "phases.json"), {"phases": self.phases,
                                                             "wall_seconds": round(time.time() - started, 1),
                                                             "precision": self.precision.to_dict()})
            from memmcl.report import write_report

            write_report(self.run_dir)
        return results


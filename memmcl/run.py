"""The run context every phase of `memmcl pipeline` receives: the run's settings and data settings, its phase store
(key, done, skip, finish), the Trainer and TensorBoard logger factories, the datamodule factory and the merge module.

Phases (`memmcl.pipeline`, `memmcl.baselines`, `memmcl.evaluation`) read their inputs from a `RunContext` and write
only into their own folder and `phases`; nothing flows back up into the pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.kinds import DEFAULT_KIND, KINDS, ExpertKind, expert_kind
from memmcl.merging.search import MergeSearch
from memmcl.precision import Precision
from memmcl.rundir import clear, file_problem, inside, write_json
from memmcl.settings import DemoConfig, ExpertConfig, MergeConfig, MultitaskConfig, TrainerConfig, trainer_args
from memmcl.tasks.spec import TaskSpec

log = logging.getLogger(__name__)
PHASE_FILE = ".phase.json"


class RunContext:
    """What every phase of one run reads: settings, the phase store under `run_dir`, and factories.

    `phases` records each phase this process ran or skipped ({phase: marker + skipped}).
    """

    def __init__(self, run_dir: Path, specs: list[TaskSpec], backbone: str, precision: Precision, seed: int = 0,
                 max_length: int = 128, eval_batch_size: int = 32, max_eval_examples: int | None = None,
                 expert: ExpertConfig | None = None, merge: MergeConfig | None = None,
                 demonstrations: DemoConfig | None = None, multitask: MultitaskConfig | None = None,
                 trainer: TrainerConfig | None = None):
        self.run_dir, self.specs, self.backbone, self.precision, self.seed = run_dir, specs, backbone, precision, seed
        self.max_length, self.eval_batch_size, self.max_eval_examples = max_length, eval_batch_size, max_eval_examples
        self.expert, self.merge = expert or ExpertConfig(), merge or MergeConfig()
        self.demos, self.trainer_config = demonstrations or DemoConfig(), trainer or TrainerConfig()
        self.multitask = multitask or MultitaskConfig()
        self.phases: dict[str, dict] = {}
        self._search: MergeSearch | None = None
        self.off_task: dict | None = None  # tangent experts' off-task prompts, drawn once per process

    # ---- the phase store -----------------------------------------------------------------------------------------

    def done(self, phase_dir: Path, key: str, outputs: tuple[str, ...] = (),
             shapes: dict[str, Callable[[object], str | None]] | None = None) -> dict | None:
        """Returns the phase's marker if it holds `key` and every output file is whole (and of the shape `shapes`
        checks, {output: problem(content)}); an unreadable marker or a missing, corrupt or wrong-shaped output is
        named in a warning and the phase is done again."""
        marker = phase_dir / PHASE_FILE
        if not marker.exists():
            return None
        shapes = shapes or {}
        for name in (PHASE_FILE, *outputs):
            path = phase_dir / name
            if problem := file_problem(path, shapes.get(name)):
                log.warning("%s: %s; the phase runs again", path, problem)
                return None
        data = json.loads(marker.read_text())
        return data if isinstance(data, dict) and data.get("key") == key else None

    def start_training(self, phase: str, parts: tuple[str, ...], key: str, outputs: tuple[str, ...]) -> bool:
        """True when the training phase in `<run_dir>/<parts>` is done (skipped); else its folder is cleared for a fresh
        run (`clear`: a symlink in its place is unlinked, never followed)."""
        if marker := self.done(self.run_dir.joinpath(*parts), key, outputs):
            self.skip(phase, marker)
            return True
        if rank_zero_only.rank == 0:
            clear(self.run_dir, *parts)
        return False

    @property
    def kind(self) -> ExpertKind:
        """The run's expert kind (`expert.kind`)."""
        return expert_kind(self.expert.kind)

    def expert_model(self, export_dir: Path) -> L.LightningModule:
        """A fresh expert of the run's kind with the expert settings, seeded so that a run depends on its settings
        only."""
        L.seed_everything(self.seed, verbose=False)
        return self.kind.module.from_settings(self.expert, self.backbone, self.dtype, self.seed, str(export_dir))

    def finish(self, phase: str, phase_dir: Path, key: str, started: float, **info) -> None:
        record = {"phase": phase, "key": key, "seconds": round(time.time() - started, 2), **info}
        write_json(phase_dir / PHASE_FILE, record)
        self.phases[phase] = {**record, "skipped": False}

    def skip(self, phase: str, marker: dict) -> None:
        if phase in self.phases:  # done by this run (in a worker process)
            return
        log.info("phase %s: done before with the same settings, skipped", phase)
        self.phases[phase] = {**marker, "skipped": True}

    def tensorboard(self, version: str) -> TensorBoardLogger:
        """Returns the logger writing to `<run_dir>/tensorboard/<version>`."""
        inside(self.run_dir, "tensorboard", version)  # versions hold task names, which must not lead out of the run
        return TensorBoardLogger(str(self.run_dir), name="tensorboard", version=version, default_hp_metric=False)

    def trainer(self, logger_version: str | None, quiet: bool = False, **kwargs) -> L.Trainer:
        """Returns a Trainer with the run's settings; `quiet` hides the per-call bars of many short evaluations."""
        t = self.trainer_config
        logger = self.tensorboard(logger_version) if logger_version else False
        return L.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=self.precision.trainer,
                         logger=logger, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=t.progress_bar and not quiet, num_sanity_val_steps=0,
                         **trainer_args(t), **kwargs)

    # ---- settings as phases read them ---------------------------------------------------------------------------

    def expert_settings(self) -> dict:
        """The expert settings that decide what is trained (not `workers`); options at their default that were added
        later are left out, so run directories of earlier versions keep their keys."""
        settings = {k: v for k, v in asdict(self.expert).items() if k != "workers"}
        for kind in KINDS.values():  # the settings only other kinds read
            if kind.name != self.kind.name:
                for name in kind.settings:
                    settings.pop(name, None)
        if self.kind.name == DEFAULT_KIND:  # LoRA experts keep the keys of versions before kinds
            del settings["kind"]
        if not settings["demonstrations"]:
            del settings["demonstrations"], settings["demo_share"]
        elif self.demos.select != "balanced":  # training demonstrations are selected as evaluation's are
            settings["demo_select"] = self.demos.select
        if not settings["weight_decay"]:
            del settings["weight_decay"]
        if settings["check_val_every_n_epoch"] == 1:
            del settings["check_val_every_n_epoch"]
        if trainer := trainer_args(self.trainer_config):  # e.g. accumulate_grad_batches (none: keys as before)
            settings["trainer"] = trainer
        return settings

    @property
    def dtype(self) -> str:
        """The frozen backbone's dtype, as the run's precision resolved it."""
        return self.precision.dtype

    @property
    def numerics(self) -> str:
        """The precision as phase keys hold it: the backbone dtype, plus Lightning's precision where that is not
        float32 (float32 runs keep the keys of versions before the setting)."""
        return self.dtype if self.precision.trainer in (None, "32-true") else f"{self.dtype}/{self.precision.trainer}"

    # ---- factories ---------------------------------------------------------------------------------------------

    def datamodule(self, specs: list[TaskSpec], **overrides) -> MultiTaskDataModule:
        """A datamodule over `specs` with the run's data settings (backbone, lengths, caps, seed); `overrides` are a
        phase's own (batch sizes, demonstrations, splits to encode)."""
        settings = dict(backbone=self.backbone, max_length=self.max_length, eval_batch_size=self.eval_batch_size,
                        max_train_examples=self.expert.max_train_examples, max_eval_examples=self.max_eval_examples,
                        seed=self.seed)
        return MultiTaskDataModule(specs, **{**settings, **overrides})

    def search(self) -> MergeSearch:
        """Returns the merge module over every expert (built once; weak mining, merge and evaluation share it)."""
        if self._search is None:
            self._search = MergeSearch(
                experts=[str(self.run_dir / "experts" / s.name / "expert") for s in self.specs], **asdict(self.merge),
                out_dir=str(inside(self.run_dir, "merge")), weak_dir=str(inside(self.run_dir, "weak")),
                backbone=self.backbone, dtype=self.dtype, seed=self.seed, max_length=self.max_length,
                eval_batch_size=self.eval_batch_size, evaluate_test=False,
                max_train_examples=self.expert.max_train_examples)
        return self._search


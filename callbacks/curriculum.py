"""`CurriculumSampler`: paces multi-task training easy → hard by re-weighting the datamodule's task sampler."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from memmcl.curriculum.difficulty import DifficultyError, difficulty_scores, read_difficulty_order, task_features
from memmcl.curriculum.pacing import START_COMPETENCE, Pacing, active_count, competence


class CurriculumSampler(Callback):
    """Opens tasks to training easy → hard, epoch by epoch, through `MultiTaskDataModule.set_task_weights`.

    Every epoch keeps its length (the datamodule's `samples_per_epoch`); its samples come from the open tasks only
    (closed tasks get `closed_weight`). The order, and the schedule's settings, are saved in Lightning checkpoints, so
    a resumed run continues the same schedule; every rank computes the same order from the same data.

    Args:
        pacing: `baby_steps` (one more task every `epochs_per_step` epochs), `linear` or `root` competence
            (from `start_competence` to all tasks at `full_epoch`, default half of `max_epochs`), or `none` (ablation).
        order: task names easy → hard; default: from `difficulty_file`, else scored from the tasks' metadata.
        difficulty_file: a `difficulty.json` written by `memmcl pipeline` (its `order` is used).
        difficulty_weights: feature weights for scoring metadata (see `memmcl.curriculum.difficulty`).
    """

    def __init__(
        self,
        pacing: Pacing = "baby_steps",
        order: list[str] | None = None,
        difficulty_file: str | None = None,
        difficulty_weights: dict[str, float] | None = None,
        epochs_per_step: int = 1,
        start_competence: float = START_COMPETENCE,
        full_epoch: int | None = None,
        closed_weight: float = 0.0,
    ):
        if not 0 < start_competence <= 1:
            raise ValueError(f"start_competence={start_competence}: expected a number in (0, 1]")
        if epochs_per_step < 1:
            raise ValueError(f"epochs_per_step={epochs_per_step}: expected >= 1")
        self.pacing, self.order, self.difficulty_file = pacing, list(order) if order else None, difficulty_file
        self.difficulty_weights = difficulty_weights
        self.epochs_per_step, self.start_competence, self.full_epoch = epochs_per_step, start_competence, full_epoch
        self.closed_weight = closed_weight
        self.history: dict[int, list[str]] = {}

    # ---- the schedule --------------------------------------------------------------------------------------------

    def active_tasks(self, epoch: int) -> list[str]:
        """Returns the tasks open at `epoch` (the easiest ones), after `setup` has fixed the order."""
        n = active_count(self.pacing, epoch, len(self.order), self.epochs_per_step, self.full_epoch, self.start_competence)
        return self.order[:n]

    def _resolve_order(self, datamodule) -> list[str]:
        names = list(datamodule.task_names)
        if self.order is not None:
            order = self.order
        elif self.difficulty_file is not None:
            order = [t for t in read_difficulty_order(self.difficulty_file) if t in names]
        else:
            meta = datamodule.metadata
            order = difficulty_scores({t: task_features(meta[t].to_dict()) for t in names}, self.difficulty_weights).order()
        if sorted(order) != sorted(names):
            raise DifficultyError(f"curriculum order {order} must name each training task once; tasks are {names}")
        return list(order)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "set_task_weights"):
            raise TypeError(f"CurriculumSampler needs a MultiTaskDataModule (set_task_weights); got {type(datamodule).__name__}")
        datamodule.setup("fit")
        self.order = self._resolve_order(datamodule)
        if trainer.world_size > 1 and trainer.strategy.broadcast(self.order, src=0) != self.order:
            raise RuntimeError(f"rank {trainer.global_rank} computed curriculum order {self.order}, unlike rank 0's")
        if self.full_epoch is None:
            self.full_epoch = max(1, (trainer.max_epochs or 2) // 2)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        active = self.active_tasks(epoch)
        trainer.datamodule.set_task_weights({t: 1.0 if t in active else self.closed_weight for t in self.order})
        if active != self.history.get(max(self.history, default=-1)):
            rank_zero_info(f"curriculum epoch {epoch}: {len(active)}/{len(self.order)} tasks open, newest '{active[-1]}'")
        self.history[epoch] = active
        if trainer.logger is not None and trainer.is_global_zero:
            c = len(active) / len(self.order) if self.pacing == "baby_steps" else competence(
                self.pacing, epoch, self.full_epoch, self.start_competence)
            metrics = {"curriculum/active_tasks": len(active), "curriculum/competence": c}
            metrics.update({f"curriculum/open/{t}": float(t in active) for t in self.order})
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"pacing": self.pacing, "order": self.order, "epochs_per_step": self.epochs_per_step,
                "start_competence": self.start_competence, "full_epoch": self.full_epoch, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("pacing", "order", "epochs_per_step", "start_competence", "full_epoch"):
            setattr(self, key, state_dict[key])
        self.history = dict(state_dict.get("history", {}))

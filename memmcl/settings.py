"""The pipeline's settings: one dataclass per phase, and the check that runs before the first phase."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Literal

import lightning as L

from memmcl.curriculum.demonstrations import DemoOrder, DemoScope, DemoSelect
from memmcl.curriculum.difficulty import check_weights
from memmcl.curriculum.pacing import START_COMPETENCE, Pacing
from memmcl.experts.kinds import DEFAULT_KIND, KindError, expert_kind
from memmcl.merging.search import MergeSearch
from memmcl.tasks.spec import NAME_RULE, TASK_NAME


class PipelineError(ValueError):
    """A pipeline setting that cannot work; the message names the config field and what was expected."""


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise PipelineError(f"{field}: expected {expected}, got {value!r}")


# The Trainer arguments each phase sets itself: logging and checkpoints, how long it trains, when and on how much it
# validates. Every other argument of `lightning.Trainer` is a `trainer:` setting of the pipeline.
PIPELINE_OWNED = ("logger", "callbacks", "fast_dev_run", "max_epochs", "min_epochs", "max_steps", "min_steps",
                  "max_time", "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                  "overfit_batches", "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps",
                  "log_every_n_steps", "enable_checkpointing", "enable_progress_bar", "enable_model_summary",
                  "reload_dataloaders_every_n_epochs", "default_root_dir")
# Ours: a CPU run by default, precision null = auto (memmcl.precision), and the progress bars on or off.
_OWN_TRAINER_FIELDS = [("accelerator", str, "cpu"), ("devices", int | str, 1), ("strategy", str, "auto"),
                       ("precision", str | None, None), ("progress_bar", bool, True)]


def _arguments_of(fn, leave_out: tuple[str, ...]) -> dict[str, tuple]:
    """{name: (type, default)} of `fn`'s arguments, less `self` and `leave_out`."""
    types = typing.get_type_hints(fn)
    return {name: (types[name], p.default) for name, p in inspect.signature(fn).parameters.items()
            if name not in ("self", *leave_out)}


def _settings_class(name: str, fields: dict[str, tuple], doc: str) -> type:
    """A dataclass with `fields` ({name: (type, default)}) in order: a pipeline section that is a class's own
    arguments, with their types and defaults."""
    cls = dataclasses.make_dataclass(name, [(f, t, dataclasses.field(default=d)) for f, (t, d) in fields.items()],
                                     namespace={"__doc__": doc})
    cls.__module__ = __name__  # (pickled into worker processes by its module's name)
    return cls


_TRAINER_DEFAULTS = _arguments_of(L.Trainer.__init__, PIPELINE_OWNED + tuple(f for f, _, _ in _OWN_TRAINER_FIELDS))
TRAINER_ARGS = tuple(_TRAINER_DEFAULTS)
TrainerConfig = _settings_class(
    "TrainerConfig", {f: (t, d) for f, t, d in _OWN_TRAINER_FIELDS} | _TRAINER_DEFAULTS,
    "Settings of every Trainer the pipeline builds: `lightning.Trainer`'s own arguments (`--trainer.strategy ddp "
    "--trainer.devices 2`, `--trainer.num_nodes 2`, `--trainer.accumulate_grad_batches 4`, `--trainer.gradient_clip_val "
    "1.0`, ...) except `PIPELINE_OWNED`, which each phase sets; `progress_bar` turns the bars on or off.")


def trainer_args(t) -> dict:
    """The `TRAINER_ARGS` of `t` that differ from the Trainer's defaults (they enter the training phases' keys)."""
    return {name: getattr(t, name) for name, (_, default) in _TRAINER_DEFAULTS.items() if getattr(t, name) != default}


@dataclass
class ExpertConfig:
    """LoRA SFT of one expert per task (see `LoRAExpert`); training stops early once validation accuracy reaches
    `stop_at_accuracy` (null: never). `demonstrations: k` > 0 trains demonstration-aware: a `demo_share` of the
    training prompts carry 1..k demonstrations of the same task's training split, never the example itself, in
    curriculum order (`MultiTaskDataModule.train_demonstrations`); the rest stay zero-shot."""

    # The kind of expert (`memmcl.experts.kinds`: lora, tangent); the LoRA and optimizer fields left null take the
    # kind's own defaults (its module's arguments: one source of truth), `resolve_expert` fills them in.
    kind: str = DEFAULT_KIND
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    lr_schedule: Literal["cosine", "constant"] | None = None
    max_epochs: int = 40
    batch_size: int = 16
    stop_at_accuracy: float | None = 0.97
    check_val_every_n_epoch: int = 1  # validate (and check stop_at_accuracy) every n epochs
    max_train_examples: int | None = None
    gradient_checkpointing: bool | None = None
    demonstrations: int = 0  # demonstration-aware training: a `demo_share` of prompts carry 1..k demonstrations
    demo_share: float = 0.5
    workers: int = 1  # on one CPU device: train this many experts at once, in processes sharing the cores
    # kinds that train against other tasks' prompts (tangent): the penalty's weight and the pool's size per task
    off_task_weight: float | None = None
    off_task_prompts: int = 32  # the off-task pool: this many training prompts of each other task (seeded draw)


KIND_DEFAULTED = ("lora_r", "lora_alpha", "lora_dropout", "lr", "weight_decay", "warmup_steps", "lr_schedule",
                  "gradient_checkpointing", "off_task_weight")


def resolve_expert(e: ExpertConfig) -> ExpertConfig:
    """Returns the expert settings with every field left null filled from the kind's own defaults (an unknown kind
    is an error naming `expert.kind`)."""
    try:
        kind = expert_kind(e.kind)
    except KindError as err:
        raise PipelineError(str(err)) from None
    return dataclasses.replace(e, **{f: kind.default(f) for f in KIND_DEFAULTED if getattr(e, f) is None})


# The MergeSearch arguments the pipeline sets from its own settings and run directory; every other argument of
# `MergeSearch` (`MergeScorer.__init__`) is a `merge:` setting with the same name, type and default.
MERGE_OWNED = ("experts", "out_dir", "backbone", "dtype", "seed", "max_length", "eval_batch_size", "evaluate_test",
               "weak_dir", "max_train_examples")
MergeConfig = _settings_class(
    "MergeConfig", _arguments_of(MergeSearch.__init__, MERGE_OWNED),
    "The evolutionary merge: every `MergeSearch` argument except `MERGE_OWNED`, with its name, type and default (see it).")


@dataclass
class MultitaskConfig:
    """Multi-task LoRA baselines (see `memmcl.baselines`): one adapter per pacing in `pacings` (`none`: every task
    from the start; `root` / `linear` / `baby_steps`: the CurriculumSampler, easy → hard), `max_epochs` epochs of
    `samples_per_epoch` samples (null: every training example once) in batches of `batch_size` (null: the experts'
    `expert.batch_size`). Empty `pacings`: no baseline."""

    pacings: list[Pacing] = dataclasses.field(default_factory=list)
    max_epochs: int = 4
    samples_per_epoch: int | None = None
    batch_size: int | None = None
    start_competence: float = START_COMPETENCE


@dataclass
class DemoConfig:
    """Curriculum in-context demonstrations for the final merge's evaluation (k = 0: none); `fixed`: one set per task
    for every query (the few-shot protocol, faster to score) instead of a set per query. The ablation scores each of
    `orders` (besides zero-shot) with `seeds` demonstration draws (seeds seed, seed + 1, ...) and reports the mean
    and spread over them. `select`: `balanced` (a seeded draw, labels in turn) or `similar` (each query's nearest
    training examples by word overlap); demonstration-aware experts (`expert.demonstrations`) are trained on
    demonstrations selected the same way."""

    k: int = 4
    scope: DemoScope = "task"
    max_length: int = 384
    fixed: bool = False
    select: DemoSelect = "balanced"
    orders: list[DemoOrder] = dataclasses.field(default_factory=lambda: ["curriculum", "random", "reverse"])
    seeds: int = 3


def demo_settings(d: DemoConfig) -> dict:
    """The demonstration settings that decide what is evaluated; `select` at its default is left out, so run
    directories of earlier versions keep their keys."""
    settings = dataclasses.asdict(d)
    if settings["select"] == "balanced":
        del settings["select"]
    return settings


def check_pipeline_settings(max_length: int, eval_batch_size: int, max_eval_examples: int | None, e: ExpertConfig,
                            m: MergeConfig, d: DemoConfig, difficulty_weights: dict | None, names: list[str],
                            mt: MultitaskConfig | None = None) -> None:
    """Checks every setting a later phase would reject, so a bad one fails before any expert is trained; each error
    names the config field (`merge.population: expected an integer >= 2, got 1`)."""
    for field, value in [("max_length", max_length), ("eval_batch_size", eval_batch_size),
                         ("expert.lora_r", e.lora_r), ("expert.max_epochs", e.max_epochs),
                         ("expert.batch_size", e.batch_size), ("expert.workers", e.workers), ("merge.blocks", m.blocks)]:
        _require(value >= 1, field, value, "an integer >= 1")
    for field, value in [("max_eval_examples", max_eval_examples), ("expert.max_train_examples", e.max_train_examples),
                         ("merge.max_weak_examples", m.max_weak_examples)]:
        _require(value is None or value >= 1, field, value, "null or an integer >= 1")
    _require(e.lr > 0, "expert.lr", e.lr, "a learning rate > 0")
    _require(e.lora_dropout is None or 0 <= e.lora_dropout < 1, "expert.lora_dropout", e.lora_dropout,
             "a probability in [0, 1)")
    _require(e.stop_at_accuracy is None or 0 < e.stop_at_accuracy <= 1, "expert.stop_at_accuracy", e.stop_at_accuracy,
             "null or an accuracy in (0, 1]")
    _require(m.population >= 2, "merge.population", m.population, "an integer >= 2")
    _require(m.generations >= 1, "merge.generations", m.generations, "an integer >= 1")
    _require(m.sigma > 0, "merge.sigma", m.sigma, "a step size > 0")
    _require(len(m.bounds) == 2 and m.bounds[0] < m.bounds[1], "merge.bounds", list(m.bounds), "[low, high] with low < high")
    _require(0 < m.density <= 1, "merge.density", m.density, "a share in (0, 1]")
    _require(m.min_weak_examples >= 0, "merge.min_weak_examples", m.min_weak_examples, "an integer >= 0")
    _require(all(x > 0 for x in m.task_arithmetic_scales or ()), "merge.task_arithmetic_scales",
             m.task_arithmetic_scales, "null or scales > 0")
    kind = expert_kind(e.kind)
    _require(e.off_task_weight is None or e.off_task_weight >= 0, "expert.off_task_weight", e.off_task_weight,
             "a weight >= 0")
    _require(e.check_val_every_n_epoch >= 1, "expert.check_val_every_n_epoch", e.check_val_every_n_epoch,
             "an integer >= 1")
    _require(e.off_task_prompts >= 1, "expert.off_task_prompts", e.off_task_prompts, "an integer >= 1")
    _require(kind.merge_methods is None or m.method in kind.merge_methods, "merge.method", m.method,
             f"one of {list(kind.merge_methods or ())} with expert.kind: {kind.name}")
    _require(kind.demonstrations or e.demonstrations == 0, "expert.demonstrations", e.demonstrations,
             f"0 with expert.kind: {kind.name}")
    _require(m.worst_weight >= 0, "merge.worst_weight", m.worst_weight, "a weight >= 0")
    _require(m.weak_anchor_ratio >= 0, "merge.weak_anchor_ratio", m.weak_anchor_ratio, "a ratio >= 0")
    if m.task_weights is not None:
        unknown = sorted(set(m.task_weights) - set(names))
        _require(not unknown, "merge.task_weights", unknown, f"task names among {names}")
        _require(all(w >= 0 for w in m.task_weights.values()) and any(w > 0 for w in m.task_weights.values()),
                 "merge.task_weights", m.task_weights, "weights >= 0, at least one > 0")
    for group, members in (m.groups or {}).items():
        _require(TASK_NAME.fullmatch(str(group)) is not None, "merge.groups", group,  # names merge/stages/<group>
                 f"group names of {NAME_RULE}")
        unknown = sorted(set(members) - set(names))
        _require(bool(members) and not unknown, f"merge.groups.{group}", members, f"a non-empty list of tasks among {names}")
    mt = mt or MultitaskConfig()
    _require(len(set(mt.pacings)) == len(mt.pacings), "multitask.pacings", mt.pacings, "each pacing once")
    _require(mt.max_epochs >= 1, "multitask.max_epochs", mt.max_epochs, "an integer >= 1")
    _require(mt.samples_per_epoch is None or mt.samples_per_epoch >= 1, "multitask.samples_per_epoch",
             mt.samples_per_epoch, "null or an integer >= 1")
    _require(mt.batch_size is None or mt.batch_size >= 1, "multitask.batch_size", mt.batch_size,
             "null or an integer >= 1")
    _require(0 < mt.start_competence <= 1, "multitask.start_competence", mt.start_competence, "a share in (0, 1]")
    _require(d.k >= 0, "demonstrations.k", d.k, "an integer >= 0")
    _require(d.seeds >= 1, "demonstrations.seeds", d.seeds, "an integer >= 1")
    _require("none" not in d.orders and len(set(d.orders)) == len(d.orders), "demonstrations.orders", d.orders,
             "orders among curriculum, random, reverse, each once (zero-shot is always scored)")
    _require(d.select != "similar" or not d.fixed, "demonstrations.fixed", d.fixed,
             "false with demonstrations.select: similar (a set per query)")
    _require(e.demonstrations >= 0, "expert.demonstrations", e.demonstrations, "an integer >= 0")
    _require(0 <= e.demo_share <= 1, "expert.demo_share", e.demo_share, "a share in [0, 1]")
    _require(e.demonstrations == 0 or d.max_length >= max_length, "demonstrations.max_length", d.max_length,
             f"at least max_length ({max_length}): training prompts with demonstrations use it")
    _require(d.k == 0 or d.max_length >= max_length, "demonstrations.max_length", d.max_length,
             f"at least max_length ({max_length}): demonstrations are added to the zero-shot prompt")
    try:
        check_weights(difficulty_weights)
    except ValueError as err:
        raise PipelineError(f"difficulty_weights: {err}") from None


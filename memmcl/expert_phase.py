"""The expert phase of `memmcl pipeline`: one LoRA (or tangent) expert per task, trained into experts/<task>/expert
with the run's expert settings, reused when its key and its recorded spec match the current ones."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_only

from memmcl.experts.expert_io import check_expert_dir
from memmcl.rundir import added_setting, clear, config_hash, write_json

if TYPE_CHECKING:
    from memmcl.run import RunContext
    from memmcl.tasks.spec import TaskSpec

log = logging.getLogger(__name__)
EXPERT_OUTPUTS = ("metrics.json", "expert/expert.yaml", "expert/adapter_config.json", "expert/adapter_model.safetensors")


def expert_key(p: RunContext, spec: TaskSpec) -> str:
    """The expert phase's key: the expert settings, the task's spec and its training and validation data."""
    settings = p.expert_settings()
    return config_hash([p.backbone, p.numerics, p.seed, p.max_length, *added_setting(p.max_eval_examples, None),
                        settings, spec.to_dict(),
                        spec.data_hash(("train", "validation"))])


def expert_done(p: RunContext, spec: TaskSpec, key: str) -> dict | None:
    """Returns the expert phase's marker when the task's expert is trained with these settings (`key`,
    `expert_key`) and its expert.yaml records the current spec (the weak phase, the merge and evaluation read that
    record); else None, and a mismatched record is named in a warning (the expert is trained again)."""
    out = p.run_dir / "experts" / spec.name
    marker = p.done(out, key, EXPERT_OUTPUTS)
    if marker is None:
        return None
    recorded = check_expert_dir(out / "expert")
    if not isinstance(recorded, dict) or recorded.get("tasks") != [json.loads(json.dumps(spec.to_dict()))]:
        log.warning("%s: does not record the current spec of task '%s' (%s); the expert is trained again",
                    out / "expert" / "expert.yaml", spec.name, spec.source)
        return None
    return marker


def expert_phase(p: RunContext, spec: TaskSpec, key: str) -> dict:
    """Trains the task's LoRA expert into experts/<task>/expert (`key`: its `expert_key`); returns its validation
    metrics."""
    out = p.run_dir / "experts" / spec.name
    if marker := expert_done(p, spec, key):
        p.skip(f"expert:{spec.name}", marker)
        return json.loads((out / "metrics.json").read_text())
    if rank_zero_only.rank == 0:
        clear(p.run_dir, "experts", spec.name)
    started, e = time.time(), p.expert
    model = p.expert_model(out / "expert")
    if p.kind.off_task and e.off_task_weight > 0:
        model.set_off_task({t: items for t, items in off_task_pool(p).items() if t != spec.name})
    dm = p.datamodule([spec], batch_size=e.batch_size, train_demonstrations=e.demonstrations,
                         train_demo_share=e.demo_share, demo_max_length=p.demos.max_length,
                         demo_scope=p.demos.scope, demo_select=p.demos.select)
    callbacks = []
    if e.stop_at_accuracy is not None:
        callbacks.append(EarlyStopping(monitor="val/acc", mode="max", stopping_threshold=e.stop_at_accuracy,
                                       patience=e.max_epochs + 1, verbose=False))
    trainer = p.trainer(f"experts/{spec.name}", max_epochs=e.max_epochs, check_val_every_n_epoch=e.check_val_every_n_epoch,
                        callbacks=callbacks, log_every_n_steps=10)
    trainer.fit(model, dm)
    if trainer.current_epoch % e.check_val_every_n_epoch:  # trained past the last validation: score the final model
        trainer.validate(model, dm, verbose=False)
    metrics = {**model.results["val"][spec.name], "epochs": trainer.current_epoch,
               "seconds": round(time.time() - started, 2), "train_examples": len(dm.examples[spec.name]["train"])}
    write_json(out / "metrics.json", metrics)
    trainer.strategy.barrier()
    p.finish(f"expert:{spec.name}", out, key, started, val_acc=metrics["acc"], epochs=metrics["epochs"])
    return metrics


def off_task_pool(p: RunContext) -> dict[str, list[tuple[list[int], list[list[int]]]]]:
    """Returns {task: `expert.off_task_prompts` of the training prompts its expert trains on} (a seeded draw, once
    per process): tangent experts are kept from moving other tasks' label scores on them."""
    if p.off_task is None:
        dm = p.datamodule(p.specs, encode_splits=["train"])
        dm.setup()
        p.off_task = dm.sample_prompts("train", p.expert.off_task_prompts, p.seed)
    return p.off_task

"""Multi-task LoRA baselines of `memmcl pipeline`: one adapter fitted on every task's training data at once, the
alternative to training experts and merging them. One adapter per pacing in `multitask.pacings`: `none` (every task
from the first epoch) or a `CurriculumSampler` pacing (tasks opened easy → hard in the run's difficulty order).

    runs/<name>/multitask/<variant>/   expert/ (peft adapter + expert.yaml), test.json (per-task test accuracy / F1),
                                       correct.json ({task: {test example id: prediction correct}})

The adapter has the experts' LoRA settings (r, alpha, lr, training cap) and their batch size unless
`multitask.batch_size` is set (tangent experts train on the whole training set per step, a batch too large for all
tasks at once); it trains `multitask.max_epochs` epochs of `multitask.samples_per_epoch` samples drawn over the open tasks (default: every training example once per
epoch) and is tested with the same scorer and test sample as every merge.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_only

from memmcl.callbacks.curriculum import CurriculumSampler
from memmcl.roster import variant_name
from memmcl.rundir import added_settings, config_hash, write_atomic
from memmcl.workers import run_in_workers, worker_threads

if TYPE_CHECKING:
    from memmcl.run import RunContext

MULTITASK_OUTPUTS = ("test.json", "correct.json", "expert/expert.yaml", "expert/adapter_model.safetensors")


def multitask_key(p: RunContext, pacing: str, order: list[str], data_hash: str) -> str:
    expert = {k: v for k, v in p.expert_settings().items() if k not in ("stop_at_accuracy", "max_epochs")}
    settings = added_settings({k: v for k, v in asdict(p.multitask).items() if k != "pacings"}, batch_size=None)
    return config_hash([p.backbone, p.numerics, p.seed, p.max_length, p.max_eval_examples, p.eval_batch_size, expert,
                        settings, pacing, order if pacing != "none" else None, data_hash])


def multitask_phase(p: RunContext, pacing: str, order: list[str], data_hash: str) -> dict:
    """Trains and tests one multi-task adapter into multitask/<variant>; returns {"test": its per-task test results,
    "correct": each test example's correctness per task (`LabelScoringModule.correct`)}."""
    name = variant_name(pacing)
    out = p.run_dir / "multitask" / name
    key = multitask_key(p, pacing, order, data_hash)
    if p.start_training(f"multitask:{name}", ("multitask", name), key, MULTITASK_OUTPUTS):
        return {part: json.loads((out / f"{part}.json").read_text()) for part in ("test", "correct")}
    started, e, m = time.time(), p.expert, p.multitask
    model = p.expert_model(out / "expert")
    dm = p.datamodule(p.specs, batch_size=m.batch_size or e.batch_size, samples_per_epoch=m.samples_per_epoch)
    callbacks = [] if pacing == "none" else [CurriculumSampler(pacing=pacing, order=order,
                                                               start_competence=m.start_competence)]
    trainer = p.trainer(f"multitask/{name}", max_epochs=m.max_epochs, callbacks=callbacks, limit_val_batches=0,
                         log_every_n_steps=10)
    trainer.fit(model, dm)
    trainer.test(model, datamodule=dm, verbose=False)
    results = {t: dict(r) for t, r in model.results["test"].items()}
    correct = model.correct["test"]
    if rank_zero_only.rank == 0:
        write_atomic(out / "test.json", json.dumps(results, indent=1).encode())
        write_atomic(out / "correct.json", json.dumps(correct).encode())
    trainer.strategy.barrier()
    per_epoch = m.samples_per_epoch or sum(len(dm.examples[s.name]["train"]) for s in p.specs)
    p.finish(f"multitask:{name}", out, key, started, samples=m.max_epochs * per_epoch, steps=trainer.global_step,
              mean_acc=sum(r["acc"] for r in results.values()) / len(results))
    return {"test": results, "correct": correct}


def multitask_phases(p: RunContext, difficulty: dict) -> dict[str, dict]:
    """The multi-task LoRA baselines (`memmcl.baselines`); returns {variant: {"test", "correct"}} (see
    `multitask_phase`)."""
    data_hash = config_hash([(s.to_dict(), s.data_hash(("train", "validation", "test"))) for s in p.specs])
    args = {pacing: (pacing, difficulty["order"], data_hash) for pacing in p.multitask.pacings}
    run_in_workers(p, [(f"multitask:{variant_name(pacing)}", multitask_phase, a) for pacing, a in args.items()
                  if not p.done(p.run_dir / "multitask" / variant_name(pacing), multitask_key(p, *a), MULTITASK_OUTPUTS)], total=len(args))
    with worker_threads(p, total=len(args)):
        return {variant_name(pacing): multitask_phase(p, *a) for pacing, a in args.items()}

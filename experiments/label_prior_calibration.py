"""Experiment (kept in history, not in the package): how much of a merge's loss is a per-task label bias?

For a finished run, scores each merge (uniform, task arithmetic, each evolved stage) on every task's test split, raw
and calibrated: each label's log-probability (softmax over the task's labels) minus the log of its mean probability
over the task's *training* inputs (no training labels are used; test data never enters the estimate).

    python experiments/label_prior_calibration.py RUN_NAME      # a run under runs/, e.g. demo
"""

import sys
from collections import defaultdict

import torch
import yaml

from memmcl.cli import build_pipeline
from memmcl.datamodule import MultiTaskDataModule

run = sys.argv[1]
_, _, p = build_pipeline(["--config", f"runs/{run}/config.yaml"])
search, trainer = p.search(), p._trainer(None, quiet=True)
record = yaml.safe_load(open(f"runs/{run}/merge/best_genome.yaml"))
merges = search.candidate_merges(record)
models = {"uniform": merges["uniform"], "task_arithmetic": merges["task_arithmetic"], "evolved_global": merges["final"]}
models.update({f"evolved_{s}": merges[f"evolved_{s}"] for s in record["stages"] if s != "global"})


def predictions(coef, split):
    data = MultiTaskDataModule(p.specs, backbone=p.backbone, max_length=p.max_length, seed=p.seed,
                               eval_batch_size=p.eval_batch_size, max_eval_examples=p.max_eval_examples,
                               predict_split=split)
    search.set_coefficients(coef)
    by_task = defaultdict(list)
    for records in trainer.predict(search, datamodule=data):
        for r in records:
            by_task[r["task"]].append(r)
    return by_task


for name, coef in models.items():
    test, train = predictions(coef, "test"), predictions(coef, "train")
    raw, calibrated = {}, {}
    for task, records in test.items():
        labels = list(records[0]["scores"])
        scores = torch.tensor([[r["scores"][label] for label in labels] for r in records]).log_softmax(-1)
        prior = torch.tensor([[r["scores"][label] for label in labels] for r in train[task]]).softmax(-1).mean(0)
        gold = torch.tensor([labels.index(r["gold"]) for r in records])
        raw[task] = (scores.argmax(-1) == gold).float().mean().item()
        calibrated[task] = ((scores - prior.log()).argmax(-1) == gold).float().mean().item()
    print(f"{name}: raw {sum(raw.values()) / len(raw):.3f}, calibrated {sum(calibrated.values()) / len(raw):.3f}",
          {t: (round(raw[t], 2), round(calibrated[t], 2)) for t in raw})

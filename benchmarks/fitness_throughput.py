"""Fitness throughput: examples/s of label scoring through a merged MultiLoRAModel (3 experts, r=8 on every
projection) over examples/s of the plain base model on the same batches. Two merge forms: rescaled factors (genome
switch in microseconds, the forward carries a rank-T·r term) and folded (the merge's weights written once per genome,
then a base-model forward; the search's default).

One timed pass is one genome's fitness: the genome is set (the folded form writes its weights) and every prompt is
scored, from no kept prefix cache (a new genome drops it anyway). The three passes run interleaved, round after
round, so drift of a shared machine hits them alike; the ratios are medians over the rounds' ratios. Prints JSON.

Run: `python benchmarks/fitness_throughput.py [rounds] [backbone]` (defaults: 15 rounds, the tiny backbone and the
embedded sc_3class validation prompts; `smollm2-135m-instruct` needs `make venv`, it takes a few minutes).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time

import torch

from memmcl.datamodule import TaskDataModule
from memmcl.experts.backbone import load_backbone
from memmcl.experts.scoring import clear_prefix_caches, score_labels
from memmcl.merging.factors import LoRAFactors
from memmcl.merging.multilora import MultiLoRAModel
from memmcl.rundir import quiet_libraries

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def genome_pass(model, batches, pad_id, before) -> float:
    """Returns the seconds of one fitness evaluation: `before()` (set the genome), then score every batch."""
    clear_prefix_caches()
    start = time.perf_counter()
    before()
    for b in batches:
        score_labels(model, b["prompt"], b["answers"], pad_id)
    return time.perf_counter() - start


def main(rounds: int = 15, backbone: str = "tiny") -> None:
    quiet_libraries()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    base, tokenizer = load_backbone(backbone)
    base.eval()
    dm = TaskDataModule("sc_3class", backbone=backbone, eval_batch_size=32,
                        max_eval_examples=None if backbone == "tiny" else 64)
    dm.setup()
    batches = list(dm.val_dataloader())
    factors = []
    for t in range(3):
        mods = {}
        for name, m in base.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                mods[name] = (torch.randn(8, m.in_features) * 0.05, torch.randn(m.out_features, 8) * 0.05, 2.0)
        factors.append(LoRAFactors(f"e{t}", mods))
    multi = MultiLoRAModel(copy.deepcopy(base), factors)
    genome = torch.tensor([0.5, 0.3, 0.8])
    pad = tokenizer.pad_token_id
    forms = {
        "base": (base, lambda: None),
        "rescaled": (multi, lambda: multi.set_genome(genome)),
        "folded": (multi, lambda: multi.set_genome(genome, fold=True)),
    }
    for model, before in forms.values():  # warm-up
        genome_pass(model, batches, pad, before)
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, (model, before) in forms.items():
            seconds[name].append(genome_pass(model, batches, pad, before))
    n = sum(len(b["prompt"]) for b in batches)
    ratio = {name: statistics.median(b / s for b, s in zip(seconds["base"], seconds[name], strict=True))
             for name in ("rescaled", "folded")}
    print(json.dumps({
        "backbone": backbone,
        "examples_per_genome": n,
        "rounds": rounds,
        "median_examples_per_s": {name: round(n / statistics.median(s), 1) for name, s in seconds.items()},
        "median_ratio_rescaled_over_base": round(ratio["rescaled"], 3),
        "median_ratio_folded_over_base": round(ratio["folded"], 3),
        "goal": "folded (the search's default) >= 0.9",
    }, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15, sys.argv[2] if len(sys.argv) > 2 else "tiny")

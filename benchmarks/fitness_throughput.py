"""Fitness throughput: examples/s of label scoring through a merged MultiLoRAModel (3 experts) over examples/s of the
plain base model on the same batches. Two merge forms: rescaled factors (genome switch in microseconds, forward
carries a rank-T·r term) and folded (merged weights written once per genome, base-model forward). Prints JSON.

Uses the tiny backbone and the embedded sc_3class validation prompts. Run: `python benchmarks/fitness_throughput.py`.
"""

from __future__ import annotations

import copy
import json
import time

import torch

from memmcl.datamodule import TaskDataModule
from memmcl.experts.backbone import load_backbone
from memmcl.experts.scoring import clear_prefix_caches, score_labels
from memmcl.merging.multilora import LoRAFactors, MultiLoRAModel

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def examples_per_second(model, batches, pad_id, repeats=3, before=None) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        if before is not None:
            before()
        n = 0
        for b in batches:
            score_labels(model, b["prompt"], b["answers"], pad_id)
            n += len(b["prompt"])
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    base, tokenizer = load_backbone("tiny")
    base.eval()
    dm = TaskDataModule("sc_3class", eval_batch_size=32)
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
    # each timed pass is one genome's fitness: every model starts without a kept prefix cache (a new genome drops the
    # merged model's anyway), so the base model does not get a free prefix from the previous pass
    plain = examples_per_second(base, batches, tokenizer.pad_token_id, before=clear_prefix_caches)
    multi.set_genome(genome)
    rescaled = examples_per_second(multi, batches, tokenizer.pad_token_id, before=lambda: multi.set_genome(genome))
    folded = examples_per_second(multi, batches, tokenizer.pad_token_id, before=lambda: multi.set_genome(genome, fold=True))
    print(json.dumps({
        "examples_per_genome": sum(len(b["prompt"]) for b in batches),
        "base_examples_per_s": plain,
        "rescaled_examples_per_s": rescaled,
        "folded_examples_per_s": folded,
        "ratio_rescaled_over_base": rescaled / plain,
        "ratio_folded_over_base": folded / plain,
        "goal": ">= 0.9",
    }, indent=1))


if __name__ == "__main__":
    main()

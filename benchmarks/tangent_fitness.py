"""Tangent-model fitness: examples/s of scoring one genome of 12 tangent experts (r=8 on every projection of the tiny
backbone, as `make demo`) in the tangent model, over examples/s of the plain base model on the same batches. Forms:
- `forward_ad`: one forward-mode AD pass along the genome's merged delta (data scored once: in-context prompts);
- `cached`: the per-expert shifts of every prompt kept (computed once, `fill`), then a genome is one small product
  per batch (the search's weak data and the test split).
And the fill itself, side by side: `fill_reverse` (what `TangentScorer` does: the scores' derivatives in a
per-example genome, a forward and one backward per label) against `fill_forward` (a forward-mode pass along each
expert's delta, as before).

Rounds run the forms interleaved, so drift of a shared machine hits them alike; ratios are medians over rounds.
Prints JSON. Run: `python benchmarks/tangent_fitness.py [rounds]` (default 10).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch

from memmcl.datamodule import TaskDataModule
from memmcl.experts.backbone import load_backbone
from memmcl.experts.scoring import clear_prefix_caches, score_labels
from memmcl.experts.tangent import TangentExpert
from memmcl.merging.search import MergeSearch
from memmcl.rundir import quiet_libraries
from memmcl.tasks.spec import embedded_task_names, load_task_spec

TASKS = embedded_task_names()


def timed(fn) -> float:
    clear_prefix_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int = 10) -> None:
    quiet_libraries()
    torch.set_num_threads(2)
    base, tokenizer = load_backbone("tiny")
    base.eval()
    dm = TaskDataModule("sc_3class", backbone="tiny", eval_batch_size=32)
    dm.setup()
    batches = list(dm.val_dataloader())
    with tempfile.TemporaryDirectory() as root:
        experts = []
        for t, task in enumerate(TASKS):
            e = TangentExpert(backbone="tiny", lora_r=8, lora_alpha=16)
            torch.manual_seed(t)
            with torch.no_grad():
                e.b.normal_(std=0.05)
            e.specs = [load_task_spec(task)]
            experts.append(str(e.save_expert(f"{root}/{task}")))
        search = MergeSearch(experts=experts, out_dir=f"{root}/merge", evaluate_test=False)
    T = len(TASKS)
    genomes = [torch.rand(1, T) * 2 for _ in range(rounds + 1)]
    pad = tokenizer.pad_token_id

    def base_pass(_):
        for b in batches:
            score_labels(base, b["prompt"], b["answers"], pad)

    def tangent_pass(genome):
        search.set_coefficients(genome)
        for b in batches:
            search.kind_scorer.scores(b["prompt"], b["answers"])

    def cached_pass(genome):
        with search.cached_shifts():
            tangent_pass(genome)

    def fill_reverse(_):
        search.kind_scorer.shifts.clear()
        cached_pass(genomes[0])

    def fill_forward(_):  # a forward-mode pass along each expert's delta, the fill before reverse mode
        for t in range(T):
            unit = torch.zeros(1, T)
            unit[0, t] = 1.0
            tangent_pass(unit)

    forms = {"base": base_pass, "forward_ad": tangent_pass, "cached": cached_pass, "fill_reverse": fill_reverse,
             "fill_forward": fill_forward}
    for fn in forms.values():  # warm-up
        fn(genomes[0])
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for r in range(rounds):
        for name, fn in forms.items():
            seconds[name].append(timed(lambda fn=fn, g=genomes[r + 1]: fn(g)))
    n = sum(len(b["prompt"]) for b in batches)
    ratio = {name: statistics.median(b / s for b, s in zip(seconds["base"], seconds[name], strict=True))
             for name in ("forward_ad", "cached")}
    fill_speedup = statistics.median(f / r for f, r in zip(seconds["fill_forward"], seconds["fill_reverse"], strict=True))
    print(json.dumps({
        "backbone": "tiny",
        "examples_per_genome": n,
        "rounds": rounds,
        "median_examples_per_s": {name: round(n / statistics.median(s), 1) for name, s in seconds.items()},
        "experts": T,
        "median_fill_seconds": {name: round(statistics.median(seconds[name]), 3) for name in ("fill_reverse", "fill_forward")},
        "median_ratio_forward_ad_over_base": round(ratio["forward_ad"], 3),
        "median_ratio_cached_over_base": round(ratio["cached"], 3),
        "median_ratio_fill_forward_over_fill_reverse": round(fill_speedup, 2),
        "goal": "cached >= 10 (a genome switch costs no forward pass); fill by reverse mode faster than forward",
    }, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)

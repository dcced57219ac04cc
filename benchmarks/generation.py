"""Extraction evaluation speed on SmolLM2-135M-Instruct: batched, prefix-shared greedy decoding
(`memmcl.experts.generation.generate_greedy`) against a one-example `model.generate` loop, side by side in one run.

The prompts are the validation prompts of an extraction task as the pipeline builds them (chat template,
instruction, sentence): `uabsa_rest14` from the data folder when there is one, else the embedded `uabsa_synthetic`.
Every method decodes greedily to an end token (end of sequence or a line break, `stop_ids`) or the task's budget. Rows:
- `loop`: `model.generate(do_sample=False)` on each prompt alone (batch 1, its own key/value cache);
- `batched`: `generate_greedy`, batch `--batch`, left-padded whole prompts (prefix sharing off);
- `batched_prefix`: the same with the shared prompt prefix encoded once per batch;
with examples/s, the ratio to `loop`, and the share of outputs identical to `loop`'s. Float32 and bf16 weights (the
pipeline's default on a CPU with native bf16) are measured in turn. Interleaved rounds, medians.

Run: `python benchmarks/generation.py [n_examples] [rounds]`; prints JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.backbone import load_backbone
from memmcl.experts.generation import generate_greedy, stop_ids
from memmcl.rundir import quiet_libraries
from memmcl.tasks.spec import resolve_data_dir

BACKBONE = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> tuple[str, list[list[int]], int]:
    real = resolve_data_dir(None) is not None and (resolve_data_dir(None) / "uabsa_rest14").is_dir()
    task = str(ROOT / "configs" / "real" / "uabsa_rest14.yaml") if real else "uabsa_synthetic"
    dm = MultiTaskDataModule([task], backbone=BACKBONE, max_length=256, max_eval_examples=n, encode_splits=["validation"])
    dm.setup()
    items = dm.items["validation"]
    return dm.specs[0].name, [it["prompt"] for it in items], items[0]["max_new"]


def main(n: int = 48, rounds: int = 2, batch: int = 16) -> dict:
    quiet_libraries()
    torch.manual_seed(0)
    task, ps, budget = prompts(n)
    out = {"task": task, "examples": len(ps), "budget_tokens": budget, "batch": batch, "threads": torch.get_num_threads()}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_backbone(BACKBONE, dtype)
        model.eval()
        stops, pad = stop_ids(tokenizer), tokenizer.pad_token_id

        def loop(model=model, stops=stops, pad=pad):
            res = []
            for p in ps:
                o = model.generate(torch.tensor([p]), max_new_tokens=budget, do_sample=False, eos_token_id=sorted(stops),
                                   pad_token_id=pad)[0, len(p):].tolist()
                res.append(next((o[:i] for i, t in enumerate(o) if t in stops), o))
            return res

        methods = {
            "loop": loop,
            "batched": lambda model=model, pad=pad, stops=stops: generate_greedy(
                model, ps, pad, stops, budget, chunk_size=batch, share_prefix=False),
            "batched_prefix": lambda model=model, pad=pad, stops=stops: generate_greedy(
                model, ps, pad, stops, budget, chunk_size=batch),
        }
        times: dict[str, list[float]] = {m: [] for m in methods}
        outputs = {}
        with torch.no_grad():
            for _ in range(rounds):
                for name, fn in methods.items():
                    start = time.perf_counter()
                    outputs[name] = fn()
                    times[name].append(time.perf_counter() - start)
        ref = outputs["loop"]
        rows = {}
        for name in methods:
            rate = len(ps) / statistics.median(times[name])
            rows[name] = {"examples_per_s": round(rate, 2),
                          "vs_loop": round(statistics.median(times["loop"]) / statistics.median(times[name]), 2),
                          "same_as_loop": round(sum(a == b for a, b in zip(outputs[name], ref, strict=True)) / len(ps), 3),
                          "new_tokens": sum(map(len, outputs[name]))}
        out[dtype] = rows
    return out


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print(json.dumps(main(*args), indent=1))

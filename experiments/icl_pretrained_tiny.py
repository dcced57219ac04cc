"""Experiment (kept in history, not in the package): can the tiny backbone learn in-context learning in pretraining?

Builds a tiny backbone whose pretraining corpus adds, to `embedded_corpus()`, EPISODES per task of k = 1..KMAX
training examples in the prompt format (the instruction, k demonstrations, a query and its answer) whose answer
words are a random permutation of the task's answers, drawn anew per episode: the only way to predict an answer is
to read the demonstrations, and the base still cannot know any task's real mapping (zero-shot stays at chance).
Training labels only (never validation or test). Then the base is scored on every task's test split zero-shot and
with k balanced demonstrations, as the pipeline's evaluation prompts them.

    python experiments/icl_pretrained_tiny.py OUT_DIR EPISODES KMAX STEPS
    memmcl pipeline --config configs/demo/pipeline.yaml --name icl --backbone OUT_DIR    # the whole method on it
"""

import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import lightning as L

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.backbone import TinyBackboneConfig, build_tiny_backbone, load_backbone
from memmcl.experts.expert import LabelScoringModule
from memmcl.tasks.corpus import embedded_corpus
from memmcl.tasks.prompts import Demonstration, prompt_body
from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import embedded_task_names, load_task_spec

out, episodes, kmax, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(1)
texts = embedded_corpus()
for name in embedded_task_names():
    spec = load_task_spec(name)
    train = read_split(spec, "train")
    for _ in range(episodes):
        word = list(spec.answers)
        rng.shuffle(word)  # label index -> answer word, this episode only
        k = rng.randint(1, kmax)
        *demos, query = rng.sample(train, k + 1)
        shots = [Demonstration(e.text, word[e.label], e.aspect) for e in demos]
        texts.append(f"{prompt_body(spec, query.text, query.aspect, shots)} {word[query.label]}")
if not (out / "config.json").exists():
    started = time.time()
    build_tiny_backbone(out, replace(TinyBackboneConfig(), pretrain_steps=steps), texts)
    print(f"built {out} from {len(texts)} texts in {time.time() - started:.0f} s")

specs = [load_task_spec(n) for n in embedded_task_names()]


class Base(LabelScoringModule):
    def __init__(self, path):
        super().__init__()
        self.model, tokenizer = load_backbone(path)
        self.pad_id = tokenizer.pad_token_id


base = Base(str(out))
trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
for k in (0, 4, 8):
    data = MultiTaskDataModule(specs, backbone=str(out), max_length=512, seed=0, demonstrations=k,
                               demo_order="random" if k else "none", demo_seed=0, encode_splits=["test"])
    trainer.test(base, datamodule=data, verbose=False)
    result = base.results["test"]
    print(f"base, {k} demonstrations: mean test accuracy {sum(r['acc'] for r in result.values()) / len(result):.3f}")

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from memmcl.callbacks import CurriculumSampler

from memmcl.curriculum.demonstrations import select_demonstrations
from memmcl.curriculum.difficulty import DifficultyError, difficulty_scores, task_features
from memmcl.curriculum.neighbours import similarity, words
from memmcl.curriculum.pacing import active_count
from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.expert import LoRAExpert
from memmcl.tasks.readers import read_task
from memmcl.tasks.spec import load_task_spec

TASKS = ["sc_binary", "irony", "sc_5class"]


def hand_built():
    # binary / short / good expert  <  3-class  <  5-class / long / poor expert
    return {
        "easy": {"n_classes": 1.0, "label_entropy": 0.9, "input_tokens": 12.0, "lexical_diversity": 0.5, "expert_error": 0.05},
        "middle": {"n_classes": 1.58, "label_entropy": 1.5, "input_tokens": 20.0, "lexical_diversity": 0.6, "expert_error": 0.2},
        "hard": {"n_classes": 2.32, "label_entropy": 2.2, "input_tokens": 35.0, "lexical_diversity": 0.7, "expert_error": 0.4},
    }


def test_difficulty_orders_hand_built_tasks_and_ignores_units():
    features = hand_built()
    d = difficulty_scores(features)
    assert d.order() == ["easy", "middle", "hard"]
    assert "weak_rate" not in d.weights  # no task has it: left out, not an error
    rescaled = {t: {**f, "input_tokens": 4.3 * f["input_tokens"] + 7, "label_entropy": f["label_entropy"] * 0.693}
                for t, f in features.items()}
    assert difficulty_scores(rescaled).scores == pytest.approx(d.scores)
    # the weights decide: only lexical diversity reversed makes "hard" the easiest
    flipped = {t: {**f, "lexical_diversity": -f["lexical_diversity"]} for t, f in features.items()}
    assert difficulty_scores(flipped, {"lexical_diversity": 1.0}).order() == ["hard", "middle", "easy"]


def test_difficulty_rejects_partial_or_unknown_features():
    features = hand_built()
    del features["middle"]["expert_error"]
    with pytest.raises(DifficultyError, match=r"'expert_error' is missing for task\(s\) \['middle'\]"):
        difficulty_scores(features)
    assert difficulty_scores(features, {"n_classes": 1, "expert_error": 0}).order()[0] == "easy"
    with pytest.raises(DifficultyError, match="unknown feature"):
        difficulty_scores(hand_built(), {"lenght": 1.0})
    with pytest.raises(DifficultyError, match=">= 0"):
        difficulty_scores(hand_built(), {"n_classes": -1.0})


def test_embedded_metadata_puts_binary_before_five_class(tiny_dir):
    dm = MultiTaskDataModule(TASKS, backbone=str(tiny_dir))
    d = difficulty_scores({t: task_features(dm.metadata[t].to_dict()) for t in TASKS})
    assert d.order().index("sc_binary") < d.order().index("sc_5class")


def test_pacing_functions_epoch_by_epoch():
    assert [active_count("baby_steps", e, 4, epochs_per_step=2) for e in range(9)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert [active_count("linear", e, 4, full_epoch=4, start=0.25) for e in range(6)] == [1, 2, 3, 4, 4, 4]
    # root competence opens tasks faster early on than linear
    assert [active_count("root", e, 10, full_epoch=10, start=0.1) for e in (0, 1, 2, 5, 10)] == [1, 4, 5, 8, 10]
    assert {active_count("none", e, 5) for e in range(3)} == {5}


class SeenTasks(L.Callback):
    """Records which tasks each epoch's training batches came from."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        names = trainer.datamodule.task_names
        self.seen.setdefault(trainer.current_epoch, set()).update(names[t] for t in batch["task"].tolist())


def fit(tiny_dir, root, callback, max_epochs, ckpt_path=None):
    torch.manual_seed(0)
    dm = MultiTaskDataModule(TASKS, backbone=str(tiny_dir), batch_size=8, max_length=64, max_train_examples=24,
                             samples_per_epoch=24)
    model = LoRAExpert(backbone=str(tiny_dir), lora_r=2, export_dir=str(root / "expert"))
    seen = SeenTasks()
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=str(root), callbacks=[callback, seen,
                        L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)])
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return seen.seen


def test_curriculum_sampler_schedule_and_resume(tiny_dir, tmp_path):
    order = ["irony", "sc_5class", "sc_binary"]
    sampler = CurriculumSampler(pacing="baby_steps", order=order)
    seen = fit(tiny_dir, tmp_path, sampler, max_epochs=2)
    assert seen == {0: {"irony"}, 1: {"irony", "sc_5class"}}
    assert sampler.history == {0: order[:1], 1: order[:2]}
    # Resumed with another order and pacing in the config: the checkpoint's schedule continues.
    resumed = CurriculumSampler(pacing="none", order=list(reversed(order)))
    seen = fit(tiny_dir, tmp_path, resumed, max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen == {2: set(order), 3: set(order)}
    assert resumed.order == order and resumed.pacing == "baby_steps"
    assert resumed.history == {0: order[:1], 1: order[:2], 2: order, 3: order}


DDP_SCRIPT = """
import json, sys
import lightning as L
from memmcl.callbacks import CurriculumSampler
from memmcl.experts.expert import LoRAExpert
from memmcl.datamodule import MultiTaskDataModule

class Seen(L.Callback):
    def __init__(self):
        self.seen = {}
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        names = trainer.datamodule.task_names
        self.seen.setdefault(trainer.current_epoch, set()).update(names[t] for t in batch["task"].tolist())

if __name__ == "__main__":
    tiny, out = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    dm = MultiTaskDataModule(TASK_LIST, backbone=tiny, batch_size=4, max_length=64, max_train_examples=16, samples_per_epoch=16)
    sampler, seen = CurriculumSampler(pacing="linear", start_competence=0.34, full_epoch=2), Seen()
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=3, logger=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[sampler, seen])
    trainer.fit(LoRAExpert(backbone=tiny, lora_r=2, export_dir=out + "/expert"), dm)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"history": sampler.history, "seen": {e: sorted(s) for e, s in seen.seen.items()}}, f)
""".replace("TASK_LIST", repr(TASKS))


def test_ddp_ranks_follow_the_same_schedule(tiny_dir, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_dir), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]
    counts = [len(ranks[0]["history"][str(e)]) for e in range(3)]
    assert counts == [2, 3, 3]  # ceil(0.34 * 3), then competence 0.67 -> 3 (linear, full at epoch 2)
    for r in ranks:  # each rank's batches come only from its open tasks
        for e, tasks in r["seen"].items():
            assert set(tasks) <= set(r["history"][e])


def test_demonstrations_come_from_train_only_in_the_configured_order(tiny_dir):
    spec = load_task_spec("sc_3class")
    splits, _ = read_task(spec)
    train_ids = {e.id for e in splits["train"]}
    heldout = {e.text for s in ("validation", "test") for e in splits[s]}
    losses = {e.id: float(i % 17) for i, e in enumerate(splits["train"])}
    by_text = {e.text: e for e in splits["train"]}
    specs = {spec.name: spec}
    query = splits["test"][0]
    demos = select_demonstrations(query, spec.name, specs, {spec.name: splits["train"]}, 6, "curriculum",
                                  losses={spec.name: losses}, seed=1)
    assert len(demos) == 6 and {d.answer for d in demos} == set(spec.answers)  # labels taken in turn
    assert all(d.text in by_text and by_text[d.text].id in train_ids and d.text not in heldout for d in demos)
    ranked = [losses[by_text[d.text].id] for d in demos]
    assert ranked == sorted(ranked)
    shuffled = select_demonstrations(query, spec.name, specs, {spec.name: splits["train"]}, 6, "random",
                                     losses={spec.name: losses}, seed=1)
    assert sorted(d.text for d in shuffled) == sorted(d.text for d in demos) and shuffled != demos
    assert select_demonstrations(query, spec.name, specs, {spec.name: splits["train"]}, 6, "none") == []
    hard_first = select_demonstrations(query, spec.name, specs, {spec.name: splits["train"]}, 6, "reverse",
                                       losses={spec.name: losses}, seed=1)
    assert hard_first == demos[::-1]


def test_fixed_demonstration_set_is_the_same_for_every_query():
    spec = load_task_spec("sc_3class")
    splits, _ = read_task(spec)
    specs, train = {spec.name: spec}, {spec.name: splits["train"]}
    sets = [select_demonstrations(q, spec.name, specs, train, 4, "curriculum", fixed=True) for q in splits["test"][:20]]
    assert all(s == sets[0] for s in sets) and len(sets[0]) == 4
    per_query = [select_demonstrations(q, spec.name, specs, train, 4, "curriculum") for q in splits["test"][:20]]
    assert len({tuple(d.text for d in s) for s in per_query}) > 1


def test_similar_demonstrations_are_the_nearest_training_examples_in_the_configured_order():
    spec = load_task_spec("absa_restaurant")
    splits, _ = read_task(spec)
    specs, train = {spec.name: spec}, {spec.name: splits["train"]}
    heldout = {e.text for s in ("validation", "test") for e in splits[s]}
    losses = {e.id: float(i % 13) for i, e in enumerate(splits["train"])}
    by_text = {e.text: e for e in splits["train"]}
    for query in splits["test"][:10]:
        demos = select_demonstrations(query, spec.name, specs, train, 5, "curriculum", losses={spec.name: losses},
                                      select="similar")
        chosen = [by_text[d.text] for d in demos]
        assert len(demos) == 5 and all(e.text != query.text and e.text not in heldout for e in chosen)
        # no training example outside the set is closer to the query than the farthest one inside it
        inside = min(similarity(words(query), words(e)) for e in chosen)
        assert all(similarity(words(query), words(e)) <= inside for e in splits["train"] if e not in chosen)
        assert inside > 0
        assert [losses[e.id] for e in chosen] == sorted(losses[e.id] for e in chosen)  # easy -> hard
        reverse = select_demonstrations(query, spec.name, specs, train, 5, "reverse", losses={spec.name: losses},
                                        select="similar")
        assert reverse == demos[::-1]
    with pytest.raises(ValueError, match="fixed"):
        select_demonstrations(splits["test"][0], spec.name, specs, train, 4, fixed=True, select="similar")
    with pytest.raises(ValueError, match="demo_fixed"):
        MultiTaskDataModule(["absa_restaurant"], demonstrations=4, demo_fixed=True, demo_select="similar")


def test_datamodule_puts_demonstrations_in_eval_prompts_only(tiny_dir):
    plain = MultiTaskDataModule(["sc_3class"], backbone=str(tiny_dir), max_length=384)
    icl = MultiTaskDataModule(["sc_3class"], backbone=str(tiny_dir), max_length=384, demonstrations=3)
    plain.setup(), icl.setup()
    assert [it["prompt"] for it in icl.items["train"]] == [it["prompt"] for it in plain.items["train"]]
    tok = icl.tokenizer
    test = {e.id: e for e in icl.examples["sc_3class"]["test"]}
    for item in icl.items["test"][:10]:
        example = test[item["id"]]
        text = tok.decode(item["prompt"])
        assert text.count("Answer:") == 4 and text.rstrip().endswith("Answer:")
        assert example.text[:20] in text.split("Answer:")[-2]  # the query comes last
        assert len(item["prompt"]) <= 384


def test_demonstration_aware_training_prompts(tiny_dir):
    tasks = ["sc_3class", "irony"]
    plain = MultiTaskDataModule(tasks, backbone=str(tiny_dir), max_length=96, max_train_examples=60)
    dm = MultiTaskDataModule(tasks, backbone=str(tiny_dir), max_length=96, max_train_examples=60,
                             train_demonstrations=3, train_demo_share=0.4, demo_max_length=384)
    plain.setup(), dm.setup()
    demos_for = dm._train_demonstration_source()
    for index, name in enumerate(tasks):
        items = [it for it in dm.items["train"] if it["task"] == index]
        zero_shot = {it["id"]: it["prompt"] for it in plain.items["train"] if it["task"] == index}
        with_demos = [it for it in items if it["demos"]]
        assert len(with_demos) == round(0.4 * len(items)) == 24  # the configured share, exactly
        assert {it["demos"] for it in with_demos} == {1, 2, 3}
        assert all(it["prompt"] == zero_shot[it["id"]] for it in items if not it["demos"])  # the rest stay zero-shot
        train = {e.id: e for e in dm.examples[name]["train"]}
        heldout = {e.text for split in ("validation", "test") for e in read_task(load_task_spec(name))[0][split]}
        for it in with_demos:
            demos = demos_for(name, [train[it["id"]]])[0]
            assert len(demos) == it["demos"]
            assert all(d.text != train[it["id"]].text and d.text not in heldout for d in demos)
            assert all(d.text in {e.text for e in train.values()} for d in demos)  # the task's own training sample
            text = dm.tokenizer.decode(it["prompt"])
            assert text.count("Answer:") == it["demos"] + 1 and len(it["prompt"]) <= 384
    assert [it["prompt"] for it in dm.items["test"]] == [it["prompt"] for it in plain.items["test"]]

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from memmcl.experts.expert import LoRAExpert
from memmcl.merging import evolution
from memmcl.merging.factors import MergeError
from memmcl.merging.search import GENOME_FILE, MergeSearch
from memmcl.merging.stage import scalar_fitness, stage_units
from memmcl.merging.weak import WeakDataError, content_hash, select_weak
from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import Example, load_task_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sc_binary", "sc_3class", "irony"]  # groups SC, SC, MAST: both stages run


@pytest.fixture(scope="module")
def experts(tiny_dir, tmp_path_factory):
    """Small random LoRA experts saved as LoRAExpert would (random B, so each expert differs from the base)."""
    root = tmp_path_factory.mktemp("experts")
    dirs = []
    for i, task in enumerate(TASKS):
        torch.manual_seed(10 + i)
        e = LoRAExpert(backbone=str(tiny_dir), lora_r=2, target_modules=["q_proj", "v_proj", "down_proj"])
        for name, p in e.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)
        e.specs = [load_task_spec(task)]
        dirs.append(str(e.save_expert(root / task)))
    return dirs


def trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)


def search(experts, out_dir, **kw):
    args = dict(population=4, generations=3, sigma=0.4, seed=3, max_weak_examples=24, eval_batch_size=32,
                evaluate_test=False)
    return MergeSearch(experts=experts, out_dir=str(out_dir), **{**args, **kw})


class Killed(Exception):
    pass


def kill_at(stage: str, generation: int):
    """A `after_generation` hook that stops the search after `generation` of `stage`, as a killed run would."""
    def kill(self, s, g):
        if (s, g) == (stage, generation):
            raise Killed
    return kill


def test_weak_data_is_training_mispredictions_only(experts, tmp_path):
    module = search(experts, tmp_path, max_weak_examples=None, min_weak_examples=0)
    specs = module.mine_weak_data(trainer())
    summary = yaml.safe_load((tmp_path / "weak" / "summary.yaml").read_text())
    for spec, task in zip(specs, TASKS, strict=True):
        rows = [json.loads(line) for line in (tmp_path / "weak" / f"{task}.jsonl").read_text().splitlines()]
        original = load_task_spec(task)
        train = {e.id: e for e in read_split(original, "train")}
        test = {content_hash(e.text, e.aspect) for e in read_split(original, "test")}
        assert rows and len(rows) == summary[task]["weak"] == summary[task]["wrong"] < len(train)
        assert summary[task]["low_margin"] == 0
        assert all(r["id"] in train and r["prediction"] != r["label"] for r in rows)
        assert all(original.labels[train[r["id"]].label] == r["label"] for r in rows)
        assert not {r["hash"] for r in rows} & test
        assert spec.splits == {"validation": str((tmp_path / "weak" / f"{task}.jsonl").resolve())}
    # the one-hot genome is the expert itself: weak data is what the expert alone gets wrong
    module.set_coefficients(torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(module.model.genome, torch.tensor([[0.0, 0.0, 1.0]]))


def test_test_content_never_enters_weak_data(tmp_path):
    rows = [{"id": "a", "text": "Great film.", "label": "positive"}, {"id": "b", "text": "Bad film.", "label": "negative"}]
    for split, data in (("train", rows), ("test", rows[:1])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    spec = spec_from_dict({"name": "leaky", "group": "SC", "instruction": "Classify.",
                           "labels": {"negative": "negative", "positive": "positive"},
                           "splits": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}})
    train = read_split(spec, "train")
    records = [{"id": "a", "gold": "positive", "prediction": "negative", "scores": {"positive": -2.0, "negative": -1.0}},
               {"id": "b", "gold": "negative", "prediction": "positive", "scores": {"positive": -1.0, "negative": -2.0}}]
    with pytest.raises(WeakDataError, match="leaky.*same content as test examples.*id 'a'"):
        select_weak(spec, train, records, min_examples=0)
    kept, info = select_weak(spec, train, records, min_examples=0, on_test_overlap="drop")
    assert [r["id"] for r in kept] == ["b"] and info["test_overlap_dropped"] == 1


def test_few_mistakes_are_topped_up_with_the_lowest_margin_training_examples():
    spec = load_task_spec("irony")
    train = read_split(spec, "train")
    records = []
    for i, e in enumerate(train):  # gold wins by a margin of i / 10, except example 5, which is wrong
        gold = spec.labels[e.label]
        other = spec.labels[1 - e.label]
        records.append({"id": e.id, "gold": gold, "prediction": other if i == 5 else gold,
                        "scores": {gold: -1.0 + (i / 10 if i != 5 else -0.5), other: -1.0}})
    rows, info = select_weak(spec, train, records, min_examples=4)
    expected = {train[5].id, train[0].id, train[1].id, train[2].id}  # the mistake, then margins 0, 0.1, 0.2
    assert {r["id"] for r in rows} == expected
    assert info == {"train": 300, "wrong": 1, "low_margin": 3, "anchors": 0, "weak": 4, "test_overlap_dropped": 0}
    assert [r["id"] for r in rows] == sorted(expected)
    # anchors: one correctly predicted example per weak one, from outside the weak set, the same for the same seed
    anchored, info = select_weak(spec, train, records, min_examples=4, anchor_ratio=1.0)
    extra = {r["id"] for r in anchored} - expected
    assert info["anchors"] == 4 and len(extra) == 4 and len(anchored) == 8
    assert all(r["prediction"] == r["label"] for r in anchored if r["id"] in extra)
    assert anchored == select_weak(spec, train, records, min_examples=4, anchor_ratio=1.0)[0]
    rows, info = select_weak(spec, train, records, min_examples=0)  # no top-up asked: the mistakes alone
    assert [r["id"] for r in rows] == [train[5].id] and info["low_margin"] == 0
    with pytest.raises(WeakDataError, match="not unique"):
        select_weak(spec, [*train, Example(train[0].id, "x", 0)], records)


def test_search_is_deterministic_and_resumes_to_the_same_result(experts, tmp_path, monkeypatch):
    whole = search(experts, tmp_path / "whole").run(trainer())
    assert set(whole["stages"]) == {"SC", "MAST", "global"}
    sc = whole["stages"]["SC"]
    assert sc["fitness"] >= sc["uniform_fitness"]  # the uniform merge is evaluated, so the best never falls below it
    # a stage kept a non-zero genome (random experts may leave the final merge at the base model): resuming must match it
    assert any(w != 0 for stage in whole["stages"].values() for w in stage["genome"])

    monkeypatch.setattr(MergeSearch, "after_generation", kill_at("MAST", 2))
    with pytest.raises(Killed):
        search(experts, tmp_path / "killed").run(trainer())
    state = tmp_path / "killed" / "stages" / "MAST" / "state.json"
    assert state.exists() and not (tmp_path / "killed" / GENOME_FILE).exists()
    monkeypatch.undo()
    resumed = search(experts, tmp_path / "killed").run(trainer(), resume=True)
    assert resumed["coefficients"] == whole["coefficients"]
    assert resumed["stages"] == whole["stages"]
    saved = yaml.safe_load((tmp_path / "killed" / GENOME_FILE).read_text())
    assert saved["coefficients"] == whole["coefficients"]


def test_genome_file_is_reusable_and_checked(experts, tmp_path):
    first = search(experts, tmp_path / "a", generations=1).run(trainer())
    module = search(experts, tmp_path / "b")
    again = module.run(trainer(), genome=str(tmp_path / "a" / GENOME_FILE))
    assert again["coefficients"] == first["coefficients"]
    expected = torch.tensor([first["coefficients"][t] for t in TASKS]).T
    assert torch.allclose(module.model.genome, expected)
    assert (tmp_path / "b" / "merged" / "adapter_model.safetensors").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"coefficients": {"sc_binary": [1.0]}}))
    with pytest.raises(MergeError, match=r"bad.yaml: field 'coefficients' lacks expert\(s\) \['irony', 'sc_3class'\]"):
        module.load_genome(bad)


def test_ga_search_runs_its_own_random_stream(experts, tmp_path):
    import random

    random.seed(123)
    before = random.random()
    random.seed(123)
    a = search(experts, tmp_path / "a", algorithm="ga", generations=2).run(trainer())
    assert random.random() == before  # DEAP's GA operators did not consume the global stream
    b = search(experts, tmp_path / "b", algorithm="ga", generations=2).run(trainer())
    assert a["coefficients"] == b["coefficients"]
    assert a["stages"]["SC"]["fitness"] >= a["stages"]["SC"]["uniform_fitness"]


def test_protect_fitness_weights_the_worst_group():
    results = {"a": {"metric": 1.0}, "b": {"metric": 0.8}, "c": {"metric": 0.0}}
    task_group = {"a": "SC", "b": "SC", "c": "MAST"}
    units = stage_units(list(results), task_group)
    assert units == {"SC": ["a", "b"], "MAST": ["c"]}
    assert stage_units(["a", "b"], task_group) == {"a": ["a"], "b": ["b"]}  # one group: its tasks are the units
    assert scalar_fitness(results, units, {}, "mean", 1.0) == pytest.approx(0.6)
    assert scalar_fitness(results, units, {}, "protect", 1.0) == pytest.approx((0.6 + 0.0) / 2)
    # a merge that keeps every group beats one with a higher mean that gives MAST away
    balanced = {"a": {"metric": 0.7}, "b": {"metric": 0.6}, "c": {"metric": 0.4}}
    assert scalar_fitness(balanced, units, {}, "mean", 1.0) < scalar_fitness(results, units, {}, "mean", 1.0)
    assert scalar_fitness(balanced, units, {}, "protect", 1.0) > scalar_fitness(results, units, {}, "protect", 1.0)


def test_pareto_front_and_knee():
    scored = [([0.0], [0.9, 0.1]), ([1.0], [0.5, 0.5]), ([2.0], [0.4, 0.4]), ([3.0], [0.1, 0.9]), ([1.0], [0.5, 0.5])]
    front = evolution.pareto_front(scored)
    assert [g for g, _ in front] == [[0.0], [1.0], [3.0]]  # (0.4, 0.4) is dominated; the duplicate kept once
    assert evolution.knee(front) == ([1.0], [0.5, 0.5])
    assert evolution.knee([([0.0], [0.3, 0.3])]) == ([0.0], [0.3, 0.3])


def test_nsga2_search_returns_its_front_and_resumes(experts, tmp_path, monkeypatch):
    whole = search(experts, tmp_path / "whole", algorithm="nsga2", generations=3).run(trainer())
    glob = yaml.safe_load((tmp_path / "whole" / "stages" / "global" / "result.yaml").read_text())
    assert glob["objectives"] == ["SC", "MAST"]
    sc = yaml.safe_load((tmp_path / "whole" / "stages" / "SC" / "result.yaml").read_text())
    assert sc["objectives"] == ["sc_binary", "sc_3class"]  # inside a group, one objective per task
    front = [(f["genome"], f["objectives"]) for f in glob["front"]]
    assert front and evolution.pareto_front(front) == front  # no member dominates another
    assert evolution.knee(front)[0] == glob["genome"]  # the stage's merge is the front's knee

    monkeypatch.setattr(MergeSearch, "after_generation", kill_at("global", 2))
    with pytest.raises(Killed):
        search(experts, tmp_path / "killed", algorithm="nsga2", generations=3).run(trainer())
    monkeypatch.undo()
    resumed = search(experts, tmp_path / "killed", algorithm="nsga2", generations=3).run(trainer(), resume=True)
    assert resumed["coefficients"] == whole["coefficients"]


def test_ddp_search_equals_one_process(experts, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "enable_checkpointing": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}},
        "model": {"class_path": "memmcl.merging.search.MergeSearch",
                  "init_args": {"experts": experts, "population": 4, "generations": 2, "sigma": 0.4, "seed": 5,
                                "max_weak_examples": 24, "evaluate_test": False}},
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        out = tmp_path / f"out{devices}"
        cmd = [sys.executable, "-m", "memmcl", "merge", "--config", str(path), f"--trainer.devices={devices}",
               f"--trainer.strategy={strategy}", f"--model.init_args.out_dir={out}", "--trainer.enable_progress_bar=false"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = yaml.safe_load((out / GENOME_FILE).read_text())
    assert results[2]["stages"] == results[1]["stages"]
    assert results[2]["coefficients"] == results[1]["coefficients"]


def test_weak_data_is_mined_again_for_another_seed(experts, tmp_path):
    """The seed samples the weak rows: weak data of seed 3 is not reused by seed 0, nor seed 0's by seed 3."""
    def entries(seed):
        search(experts, tmp_path, seed=seed, min_weak_examples=40, max_weak_examples=8).mine_weak_data(trainer())
        summary = yaml.safe_load((tmp_path / "weak" / "summary.yaml").read_text())
        rows = {t: (tmp_path / "weak" / f"{t}.jsonl").read_text() for t in TASKS}
        return {t: summary[t].get("seed") for t in TASKS}, rows

    seeds, rows3 = entries(3)
    assert seeds == dict.fromkeys(TASKS, 3)
    seeds, rows0 = entries(0)
    assert seeds == dict.fromkeys(TASKS, None) and rows0 != rows3  # mined again, another sample
    assert entries(3) == (dict.fromkeys(TASKS, 3), rows3)

"""Extraction tasks: readers, the target format, micro-F1, batched generation, weak data, a mixed pipeline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from memmcl.experts.generation import generate_greedy
from memmcl.merging.weak import gold_loss, select_weak, weak_spec
from memmcl.tasks.extraction import TupleCounts, render
from memmcl.tasks.prompts import answer_ids
from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import TaskError, load_task_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]


def extraction_spec(tmp_path, fmt="csv", slots=("aspect", "opinion", "sentiment"), **extra):
    data = {"name": "ex", "group": "ABSA", "kind": "extraction", "instruction": "List them.", "slots": list(slots),
            "spans": [s for s in slots if s in ("aspect", "opinion")],
            "labels": {"negative": "negative", "neutral": "neutral", "positive": "positive"},
            "aliases": {"NEG": "negative", "POS": "positive", "NEU": "neutral"}, "format": fmt,
            "fields": {"text": "text", "label": "label_text", "id": "id"},
            "splits": {"train": str(tmp_path / f"train.{'txt' if fmt == 'absa_lines' else fmt}")}, **extra}
    return spec_from_dict(data, source=str(tmp_path / "ex.yaml"))


def test_csv_literal_word_tuples(tmp_path):
    (tmp_path / "train.csv").write_text(
        'id,text,label_text\n'
        'a,"The  food was great , the service slow .","[(\'food\', \'great\', \'positive\'), (\'service\', \'slow\', \'negative\')]"\n'
        'b,Nothing here .,[]\n')
    a, b = read_split(extraction_spec(tmp_path), "train")
    assert a.text == "The food was great , the service slow ."  # single-spaced, as the spans are
    assert a.tuples == (("food", "great", "positive"), ("service", "slow", "negative")) and b.tuples == ()


def test_absa_lines_index_and_word_tuples(tmp_path):
    (tmp_path / "train.txt").write_text(
        "The battery life is bad but the screen shines .####[([1, 2], [4], 'NEG'), ([7], [8], 'POS')]\n")
    (e,) = read_split(extraction_spec(tmp_path, "absa_lines"), "train")
    assert e.tuples == (("battery life", "bad", "negative"), ("screen", "shines", "positive"))
    # ABSA-QUAD word tuples in the file's own order (aspect, category, sentiment, opinion), NULL implicit aspects
    (tmp_path / "train.txt").write_text("Worth every penny .####[['NULL', 'restaurant prices', 'positive', 'Worth']]\n")
    quad = extraction_spec(tmp_path, "absa_lines", slots=("category", "aspect", "opinion", "sentiment"),
                           file_slots=["aspect", "category", "sentiment", "opinion"], nullable=["aspect"],
                           slot_values={"category": ["restaurant prices", "food quality"]})
    (e,) = read_split(quad, "train")
    assert e.tuples == (("restaurant prices", "NULL", "Worth", "positive"),)


@pytest.mark.parametrize("line, message", [
    ("Good food .####[([0], 'POS')]", r"train.txt:1: tuple 0 is \(\[0\], 'POS'\); expected 3 values"),
    ("Good food .####[([0], [7], 'POS')]", r"train.txt:1: tuple 0: opinion indices \[7\] are not positions"),
    ("Good food .####[('pizza', 'Good', 'POS')]", r"train.txt:1: tuple 0: aspect 'pizza' is not a span of the sentence"),
    ("Good food .####[('food', 'Good', 'great')]", r"train.txt:1: tuple 0: sentiment 'great' is not one of"),
    ("Good food .####[('NULL', 'Good', 'POS')]", r"train.txt:1: tuple 0: aspect is NULL"),
    ("Good food .####[('food', 'Good', 'POS')", r"train.txt:1: tuples .* are not a Python/JSON list literal"),
    ("Good food .", r"train.txt:1: expected 'sentence####\[tuples\]'"),
])
def test_bad_tuples_are_named_by_file_and_line(tmp_path, line, message):
    (tmp_path / "train.txt").write_text(line + "\n")
    with pytest.raises(TaskError, match=message):
        read_split(extraction_spec(tmp_path, "absa_lines"), "train")


def test_spec_fields_are_checked(tmp_path):
    with pytest.raises(TaskError, match="field 'metric' is 'accuracy'; an extraction task takes tuple_f1"):
        extraction_spec(tmp_path, metric="accuracy")
    with pytest.raises(TaskError, match="'file_slots'"):
        extraction_spec(tmp_path, file_slots=["aspect", "sentiment"])
    with pytest.raises(TaskError, match=r"field\(s\) \['slots'\] belong to extraction tasks"):
        spec_from_dict({"name": "c", "group": "SC", "instruction": "x", "labels": {"a": "a", "b": "b"},
                        "splits": {"train": "x.jsonl"}, "slots": ["aspect"]})
    spec = load_task_spec(str(ROOT / "configs" / "real" / "stance.yaml"))
    assert spec.metric == "mean_f1(against, favor)" and spec.task_kind.metric_value(spec, 0.9, 0.5, [0.2, 0.4, 0.9]) == pytest.approx(0.3)
    assert spec_from_dict(spec.to_dict(), source="again").metric == spec.metric


def test_target_round_trips_through_tokenization(tiny):
    _, tokenizer = tiny
    spec = load_task_spec("aste_synthetic")
    for example in read_split(spec, "train")[:40]:
        ids = answer_ids(tokenizer, render(example.tuples))
        assert spec.task_kind.parse_answer(spec, tokenizer.decode(ids)) == example.tuples


def test_malformed_answers_score_as_empty_and_are_counted():
    spec = load_task_spec("uabsa_synthetic")
    gold = (("food", "positive"), ("service", "negative"))
    assert spec.task_kind.parse_answer(spec, "food | positive ; service") is None  # wrong arity
    assert spec.task_kind.parse_answer(spec, "food | tasty") is None  # not a sentiment
    assert spec.task_kind.parse_answer(spec, "None") == () and spec.task_kind.parse_answer(spec, " food |positive ") == (("food", "positive"),)
    counts = TupleCounts()
    counts.add(None, gold)
    counts.add(spec.task_kind.parse_answer(spec, "food | positive ; pasta | neutral"), gold)
    counts.add((), ())
    # hand count: 1 matched of 2 predicted and 4 gold -> P 1/2, R 1/4, F1 = 2 PR / (P + R) = 1/3; 1 exact set of 3
    scores = counts.scores()
    assert (scores["precision"], scores["recall"]) == (0.5, 0.25) and scores["f1"] == pytest.approx(1 / 3)
    assert scores["acc"] == pytest.approx(1 / 3) and scores["malformed"] == 1 and scores["metric"] == scores["f1"]


def test_batched_generation_equals_generate_one_example_at_a_time(tiny):
    model, tokenizer = tiny
    spec = load_task_spec("aste_synthetic")
    from memmcl.tasks.prompts import build_prompt

    prompts = [build_prompt(tokenizer, spec, e, 128, longest_answer=32) for e in read_split(spec, "validation")[:12]]
    prompts.append(prompts[0][:5])  # a prompt that shares no prefix with the others
    eos = tokenizer.eos_token_id
    batched = generate_greedy(model, prompts, tokenizer.pad_token_id, {eos}, 24, chunk_size=8)
    for prompt, got in zip(prompts, batched, strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert got == (out[: out.index(eos)] if eos in out else out)


def test_decode_attention_equals_sdpa_and_serves_every_decoding_step(tiny, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import memmcl.experts.packing as packing

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    query, key, value = torch.randn(4, 6, 1, 8), torch.randn(4, 2, 7, 8), torch.randn(4, 2, 7, 8)
    mask = torch.ones(4, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., :3] = mask[3, ..., :5] = False  # left padding
    got, _ = packing.decode_attention(module, query, key, value, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert got.shape == want.shape == (4, 1, 6, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # greedy generation decodes through it: one call per layer and decoding step
    model, tokenizer = tiny
    calls = []
    monkeypatch.setitem(packing.AttentionInterface._global_mapping, packing.DECODE_ATTENTION,
                        lambda *a, **k: calls.append(a[1].shape) or packing.decode_attention(*a, **k))
    prompts = [[5, 6, 7, 8], [9, 10]]
    generate_greedy(model, prompts, tokenizer.pad_token_id, set(), 3)
    assert len(calls) == 2 * model.config.num_hidden_layers and all(s[0] == 2 and s[2] == 1 for s in calls)


def test_weak_data_of_an_extraction_task(tmp_path):
    spec = load_task_spec("uabsa_synthetic")
    train = read_split(spec, "train")[:6]
    records = [{"task": spec.name, "id": e.id, "kind": "extraction", "gold": render(e.tuples),
                "prediction": render(e.tuples) if i % 2 else None, "scores": {"gold": -0.1 * i}}
               for i, e in enumerate(train)]
    rows, summary = select_weak(spec, train, records, min_examples=4)
    assert summary["wrong"] == 3 and summary["low_margin"] == 1  # the wrong ones, then the least likely right one
    assert {r["id"] for r in rows} == {train[i].id for i in (0, 2, 4, 5)}
    assert gold_loss(records[5]) == pytest.approx(0.5)
    path = tmp_path / "weak.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    back = read_split(weak_spec(spec, path), "validation")  # read back as the fitness reads it: gold tuples kept
    assert {e.id: e.tuples for e in back} == {e.id: e.tuples for e in train if e.id in {r["id"] for r in rows}}


def test_embedded_extraction_files_are_what_the_generator_writes(tmp_path):
    (tmp_path / "configs" / "tasks").mkdir(parents=True)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); "
                    f"import extraction_suite, pathlib; extraction_suite.write(pathlib.Path({str(tmp_path)!r}))"],
                   check=True)
    for task in ("uabsa_synthetic", "aste_synthetic"):
        for split in ("train", "validation", "test"):
            rel = Path("memmcl") / "tasks" / "embedded" / task / f"{split}.jsonl"
            assert (tmp_path / rel).read_text() == (ROOT / rel).read_text()
        rel = Path("configs") / "tasks" / f"{task}.yaml"
        assert yaml.safe_load((tmp_path / rel).read_text()) == yaml.safe_load((ROOT / rel).read_text())


def test_a_pipeline_mixes_classification_and_extraction_end_to_end(tmp_path, tiny_dir):
    from memmcl.pipeline import DemoConfig, ExpertConfig, MergeConfig, MultitaskConfig, Pipeline, TrainerConfig

    p = Pipeline(
        name="mixed", root=str(tmp_path), backbone=str(tiny_dir), tasks=["sc_binary", "uabsa_synthetic"], max_length=96,
        expert=ExpertConfig(lora_r=4, lora_alpha=8, max_epochs=3, batch_size=8, max_train_examples=48),
        merge=MergeConfig(population=4, generations=2, max_weak_examples=12, min_weak_examples=8),
        demonstrations=DemoConfig(k=1, max_length=160, seeds=1, orders=["curriculum"]),
        trainer=TrainerConfig(progress_bar=False), multitask=MultitaskConfig(pacings=["none"], max_epochs=1))
    results = p.run()
    run = tmp_path / "mixed"
    extraction = results["models"]["expert"]["uabsa_synthetic"]
    assert set(extraction) == {"acc", "f1", "precision", "recall", "malformed", "metric"}
    assert extraction["metric"] == extraction["f1"]
    assert results["metrics"]["uabsa_synthetic"] == {"metric": "tuple_f1", "kind": "extraction"}
    for model, per_task in results["models"].items():  # every model, both kinds, the headline mean of each metric
        assert set(per_task) == {"sc_binary", "uabsa_synthetic"}, model
        assert results["means"][model]["overall"] == pytest.approx(
            (per_task["sc_binary"]["metric"] + per_task["uabsa_synthetic"]["metric"]) / 2)
    # weak data of the extraction expert: its mispredicted training sentences, gold tuples kept
    weak = [json.loads(line) for line in (run / "weak" / "uabsa_synthetic.jsonl").read_text().splitlines()]
    assert weak and all(isinstance(r["label"], list) for r in weak)
    assert any(r["prediction"] != render(tuple(map(tuple, r["label"]))) for r in weak)
    losses = json.loads((run / "weak" / "uabsa_synthetic.example_loss.json").read_text())
    assert len(losses) == 48 and all(v >= 0 for v in losses.values())
    stages = yaml.safe_load((run / "merge" / "best_genome.yaml").read_text())["stages"]
    assert set(stages) == {"SC", "ABSA", "global"}
    report = (run / "report" / "report.md").read_text()
    assert "## Test score: each task's standard metric" in report and "tuple_f1" in report


def test_tangent_experts_refuse_extraction_tasks(tmp_path, tiny_dir):
    from memmcl.pipeline import ExpertConfig, Pipeline

    with pytest.raises(ValueError, match="tangent experts score labels; extraction task"):
        Pipeline(name="t", root=str(tmp_path), backbone=str(tiny_dir), tasks=["sc_binary", "uabsa_synthetic"],
                 expert=ExpertConfig(kind="tangent"))


def test_a_tangent_model_refuses_extraction_tasks_when_it_meets_them(tiny_dir):
    import lightning as L

    from memmcl.datamodule import MultiTaskDataModule
    from memmcl.experts.expert_io import ExpertError
    from memmcl.experts.tangent import TangentExpert

    model = TangentExpert(backbone=str(tiny_dir), lora_r=2, lora_alpha=4, target_modules=["q_proj"])
    dm = MultiTaskDataModule(["sc_binary", "uabsa_synthetic"], backbone=str(tiny_dir), max_length=96, max_eval_examples=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ExpertError, match=r"tangent experts score labels; extraction task\(s\) \['uabsa_synthetic'\]"):
        trainer.validate(model, datamodule=dm, verbose=False)

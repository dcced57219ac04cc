import importlib.util
import json
import logging
from pathlib import Path

import pytest
import yaml

from memmcl.tasks.readers import read_split, read_task
from memmcl.tasks.spec import TaskError, embedded_task_names, load_task_spec, load_task_specs, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]


def spec(tmp_path, fmt="jsonl", group="SC", aspect=None, labels=None, splits=None, **extra):
    data = {"name": "t", "group": group, "instruction": "Classify.", "format": fmt,
            "labels": labels or {"negative": "negative", "positive": "positive"},
            "fields": {"text": "text", "label": "label", "aspect": aspect, "id": "id"},
            "splits": splits or {"train": "train.jsonl", "test": "test.jsonl"}, **extra}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_task_spec(str(path))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_reader_with_configurable_fields(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"sentence": "good", "y": "positive", "uid": 7}\n\n{"sentence": "bad", "y": "negative"}\n')
    data = {"name": "t", "group": "SC", "instruction": "x", "labels": {"negative": "neg", "positive": "pos"},
            "fields": {"text": "sentence", "label": "y", "id": "uid"}, "splits": {"train": "train.jsonl"}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    examples = read_split(load_task_spec(str(tmp_path / "t.yaml")), "train")
    assert [(e.id, e.text, e.label) for e in examples] == [("7", "good", 1), ("t-3", "bad", 0)]


def test_malformed_json_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": \n')
    with pytest.raises(TaskError, match=r"train.jsonl:2: malformed JSON"):
        read_split(spec(tmp_path), "train")


def test_label_outside_spec_names_line_and_valid_labels(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "positive"}, {"text": "meh", "label": "pos"}])
    with pytest.raises(TaskError, match=r"train.jsonl:2: label 'pos' is not one of \['negative', 'positive'\]"):
        read_split(spec(tmp_path), "train")


def test_empty_text_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "  ", "label": "positive"}])
    with pytest.raises(TaskError, match=r"train.jsonl:1: field 'text' is missing or empty"):
        read_split(spec(tmp_path), "train")


def test_aspect_field_needs_a_value(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good food", "label": "positive", "aspect": "food"}, {"text": "ok", "label": "negative"}])
    with pytest.raises(TaskError, match=r"train.jsonl:2: field 'aspect' is missing or empty"):
        read_split(spec(tmp_path, group="ABSA", aspect="aspect"), "train")


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="split 'train' of task 't' is empty"):
        read_split(spec(tmp_path), "train")


def test_two_tasks_with_one_name(tmp_path):
    s = spec(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "t.yaml").write_text(Path(s.source).read_text())
    with pytest.raises(TaskError, match="two tasks are named 't'"):
        load_task_specs([s.source, str(other / "t.yaml")])


def test_unknown_format_lists_known_ones(tmp_path):
    with pytest.raises(TaskError, match=r"field 'format' is 'parquet'; expected one of \['jsonl'"):
        spec(tmp_path, fmt="parquet")


def test_train_test_duplicates_are_reported(tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "same text", "label": "positive"}, {"text": "a", "label": "negative"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "same text", "label": "positive"}, {"text": "b", "label": "negative"}])
    with caplog.at_level(logging.WARNING):
        _, leaked = read_task(spec(tmp_path))
    assert leaked == 1
    assert "1 test example(s) also stand in train" in caplog.text and "same text" in caplog.text


def test_csv_and_tsv_readers(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"good, really",positive\nbad,negative\n')
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood\tpositive\nbad\tnegative\n")
    for fmt in ("csv", "tsv"):
        s = spec(tmp_path, fmt=fmt, splits={"train": f"train.{fmt}"})
        assert [(e.text, e.label) for e in read_split(s, "train")][1] == ("bad", 0)
    assert read_split(spec(tmp_path, fmt="csv", splits={"train": "train.csv"}), "train")[0].text == "good, really"
    (tmp_path / "bad.csv").write_text("text,label\ngood,positive\nbad,awful\n")
    with pytest.raises(TaskError, match=r"bad.csv:3: label 'awful'"):
        read_split(spec(tmp_path, fmt="csv", splits={"train": "bad.csv"}), "train")


def test_json_list_reader(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"text": "good", "label": "positive"}, {"text": "", "label": "negative"}]))
    with pytest.raises(TaskError, match=r"train.json: item 1: field 'text'"):
        read_split(spec(tmp_path, fmt="json", splits={"train": "train.json"}), "train")


SEMEVAL = """<?xml version="1.0" encoding="UTF-8"?>
<sentences>
  <sentence id="1"><text>Great food but the service was dreadful.</text>
    <aspectTerms><aspectTerm term="food" polarity="positive" from="6" to="10"/>
      <aspectTerm term="service" polarity="negative" from="19" to="26"/></aspectTerms>
    <aspectCategories><aspectCategory category="food" polarity="positive"/></aspectCategories></sentence>
  <sentence id="2"><text>The menu is long but pricey.</text>
    <aspectTerms><aspectTerm term="menu" polarity="conflict" from="4" to="8"/></aspectTerms></sentence>
</sentences>"""


def test_semeval_xml_terms_categories_and_conflict(tmp_path):
    (tmp_path / "train.xml").write_text(SEMEVAL)
    labels = {"negative": "negative", "neutral": "neutral", "positive": "positive"}
    s = spec(tmp_path, fmt="semeval_xml", group="ABSA", labels=labels, splits={"train": "train.xml"})
    assert [(e.aspect, s.labels[e.label]) for e in read_split(s, "train")] == [("food", "positive"), ("service", "negative")]
    s = spec(tmp_path, fmt="semeval_xml", group="ABSA", labels={**labels, "conflict": "mixed"}, splits={"train": "train.xml"},
             keep_conflict=True)
    assert [e.aspect for e in read_split(s, "train")] == ["food", "service", "menu"]
    s = spec(tmp_path, fmt="semeval_xml", group="ABSA", labels=labels, splits={"train": "train.xml"}, semeval_unit="category")
    assert [(e.aspect, e.text) for e in read_split(s, "train")] == [("food", "Great food but the service was dreadful.")]
    (tmp_path / "broken.xml").write_text("<sentences>\n<sentence id='1'>\n</sentences>")
    with pytest.raises(TaskError, match=r"broken.xml:3: malformed XML"):
        read_split(spec(tmp_path, fmt="semeval_xml", group="ABSA", labels=labels, splits={"train": "broken.xml"}), "train")


def test_tweeteval_folder(tmp_path):
    folder = tmp_path / "irony"
    folder.mkdir()
    (folder / "mapping.txt").write_text("0\tnot_ironic\n1\tironic\n")
    (folder / "train_text.txt").write_text("Great, rain again.\nI love sunny days.\n")
    (folder / "train_labels.txt").write_text("1\n0\n")
    (folder / "val_text.txt").write_text("a\nb\n")
    (folder / "val_labels.txt").write_text("1\n")
    s = spec(tmp_path, fmt="tweeteval", labels={"not_ironic": "no", "ironic": "yes"}, splits={"train": "irony", "validation": "irony"})
    assert [(e.text, s.labels[e.label]) for e in read_split(s, "train")] == [("Great, rain again.", "ironic"), ("I love sunny days.", "not_ironic")]
    with pytest.raises(TaskError, match="val_labels.txt: 1 lines, but val_text.txt has 2"):
        read_split(s, "validation")


def test_missing_split_file_names_path(tmp_path):
    with pytest.raises(TaskError, match="train.jsonl: no such file for split 'train'"):
        read_split(spec(tmp_path), "train")


def test_unknown_task_name_lists_shipped_tasks():
    with pytest.raises(TaskError, match="shipped: .*sc_binary"):
        load_task_spec("no_such_task")


def test_spec_round_trips_through_dict(tmp_path):
    s = load_task_spec("absa_restaurant")
    again = spec_from_dict(s.to_dict())
    assert (again.labels, again.answers, again.aspect_field, again.splits) == (s.labels, s.answers, s.aspect_field, s.splits)


def test_embedded_suite_is_what_the_generator_writes(tmp_path):
    loader = importlib.util.spec_from_file_location("suite_generator", ROOT / "tools" / "suite_generator.py")
    suite_generator = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(suite_generator)  # a script in tools/, not part of the installed package
    suite_generator.write_suite(tmp_path / "data", tmp_path / "specs")
    for name in (n for n in embedded_task_names() if not load_task_spec(n).kind == "extraction"):  # tools/extraction_suite.py
        assert (tmp_path / "specs" / f"{name}.yaml").read_text() == (ROOT / "configs/tasks" / f"{name}.yaml").read_text()
        for split in ("train", "validation", "test"):
            committed = ROOT / "memmcl/tasks/embedded" / name / f"{split}.jsonl"
            assert (tmp_path / "data" / name / f"{split}.jsonl").read_bytes() == committed.read_bytes()
    size = sum(p.stat().st_size for p in (ROOT / "memmcl/tasks/embedded").rglob("*.jsonl"))
    assert size < 2 * 1024 * 1024


def test_embedded_suite_mirrors_the_method_groups_without_leakage():
    specs = load_task_specs(embedded_task_names())
    groups = {s.group for s in specs}
    assert groups == {"SC", "ABSA", "MAST"} and 12 <= len(specs) <= 15
    for s in specs:
        data, leaked = read_task(s)
        assert leaked == 0, s.name
        assert {k: len(v) for k, v in data.items()} == {"train": 300, "validation": 100, "test": 100}
        if s.kind == "extraction":  # every sentiment among the tuples, and sentences without any
            assert {t[-1] for e in data["train"] for t in e.tuples} == set(s.labels), s.name
            assert any(not e.tuples for e in data["train"]), s.name
        else:
            assert {e.label for e in data["train"]} == set(range(s.n_classes)), s.name

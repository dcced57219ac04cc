"""Task files as users bring them: YAML booleans, per-split formats, label aliases, BOMs, bad bytes, TweetEval stance
folders, stratified caps, relative spec paths, the data folder setting, and the shipped real-task specs."""

import os
from collections import Counter
from pathlib import Path

import pytest

from memmcl.tasks.readers import read_split, read_task, stratified_sample
from memmcl.tasks.spec import DATA_DIR_ENV, Example, TaskError, load_task_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "realdata"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_unquoted_yes_no_stay_words(tmp_path):
    spec_file = write(tmp_path / "irony.yaml", "name: irony\ngroup: MAST\ninstruction: Ironic? Answer yes or no.\n"
                                               "labels:\n  no: no\n  yes: yes\nformat: csv\n"
                                               "splits: {train: train.csv}\n")
    write(tmp_path / "train.csv", "id,text,label\n1,great weather for a picnic,yes\n2,nice day,no\n")
    spec = load_task_spec(str(spec_file))
    assert spec.labels == ("no", "yes") and spec.answers == ("no", "yes")
    assert [e.label for e in read_split(spec, "train")] == [1, 0]


def test_boolean_label_is_a_clear_error():
    with pytest.raises(TaskError, match=r"<memory>: field 'labels': False: False holds a YAML boolean"):
        spec_from_dict({"name": "t", "group": "MAST", "instruction": "x", "labels": {False: False, True: True},
                        "splits": {"train": "a.csv"}})


def test_split_with_its_own_format_and_fields(tmp_path):
    folder = tmp_path / "tweeteval_hate"
    write(folder / "train_text.txt", "I hate mondays\nlovely people\n")
    write(folder / "train_labels.txt", "1\n0\n")
    write(folder / "mapping.txt", "0\tnot-hate\n1\thate\n")
    write(tmp_path / "test.csv", "tweet,class\nthey should all leave,hate\nwelcome all,non-hate\n")
    spec = spec_from_dict({
        "name": "hate", "group": "MAST", "instruction": "Hateful?", "labels": {"non-hate": "no", "hate": "yes"},
        "aliases": {"not-hate": "non-hate"}, "format": "tweeteval",
        "splits": {"train": str(folder), "test": {"path": "test.csv", "format": "csv",
                                                  "fields": {"text": "tweet", "label": "class"}}},
    }, source=str(tmp_path / "hate.yaml"))
    data, _ = read_task(spec)
    assert [(e.text, e.label) for e in data["train"]] == [("I hate mondays", 1), ("lovely people", 0)]
    assert [(e.text, e.label) for e in data["test"]] == [("they should all leave", 1), ("welcome all", 0)]
    again = spec_from_dict(spec.to_dict(), source="expert.yaml")  # as saved beside an expert, from anywhere
    assert read_split(again, "test") == data["test"] and again.aliases == {"not-hate": "non-hate"}


def test_alias_to_unknown_label_names_the_field():
    with pytest.raises(TaskError, match=r"field 'aliases': 'nothate' -> 'nonhate'; expected a quoted value -> one of"):
        spec_from_dict({"name": "t", "group": "MAST", "instruction": "x", "labels": {"non-hate": "no", "hate": "yes"},
                        "aliases": {"nothate": "nonhate"}, "splits": {"train": "a.csv"}})


def csv_spec(tmp_path, **extra):
    return spec_from_dict({"name": "t", "group": "SC", "instruction": "x", "format": "csv",
                           "labels": {"negative": "negative", "positive": "positive"},
                           "fields": {"text": "text", "label": "label", "id": "id"},
                           "splits": {"train": "train.csv"}, **extra}, source=str(tmp_path / "t.yaml"))


def test_excel_bom_keeps_the_header(tmp_path):
    write(tmp_path / "train.csv", b"\xef\xbb\xbfid,text,label\r\n7,good,positive\r\n8,bad,negative\r\n")
    assert [(e.id, e.text) for e in read_split(csv_spec(tmp_path), "train")] == [("7", "good"), ("8", "bad")]


def test_non_utf8_byte_names_file_and_line(tmp_path):
    write(tmp_path / "train.csv", b"id,text,label\n1,good,positive\n2,caf\xe9 was bad,negative\n")
    with pytest.raises(TaskError, match=r"train.csv:3: byte 0xe9 is not UTF-8"):
        read_split(csv_spec(tmp_path), "train")


def test_tweeteval_stance_folders_carry_their_target(tmp_path):
    root = tmp_path / "stance"
    write(root / "mapping.txt", "0\tnone\n1\tagainst\n2\tfavor\n")
    for target, texts, labels in [("abortion", "life first\nmy body\n", "1\n2\n"), ("climate", "act now\n", "2\n")]:
        write(root / target / "train_text.txt", texts)
        write(root / target / "train_labels.txt", labels)
    spec = spec_from_dict({"name": "stance", "group": "MAST", "instruction": "Stance?", "format": "tweeteval",
                           "labels": {"against": "against", "favor": "favor", "none": "none"},
                           "fields": {"aspect": "target"}, "splits": {"train": str(root)}})
    examples = read_split(spec, "train")
    assert [(e.text, e.aspect, spec.labels[e.label]) for e in examples] == [
        ("life first", "abortion", "against"), ("my body", "abortion", "favor"), ("act now", "climate", "favor")]
    assert len({e.id for e in examples}) == 3
    no_aspect = spec_from_dict({**spec.to_dict(), "fields": {"aspect": None}})
    with pytest.raises(TaskError, match=r"needs fields.aspect"):
        read_split(no_aspect, "train")


def test_caps_are_seeded_label_stratified_samples():
    # a label-sorted source: the first 240 rows are nearly all positive
    examples = [Example(str(i), f"t{i}", 1 if i < 700 else 0) for i in range(1000)]
    sample = stratified_sample(examples, 240, seed=0)
    assert Counter(e.label for e in sample) == {1: 168, 0: 72}
    assert sample == stratified_sample(examples, 240, seed=0) and sample != stratified_sample(examples, 240, seed=1)
    assert [int(e.id) for e in sample] == sorted(int(e.id) for e in sample)  # file order kept
    assert stratified_sample(examples[:10], 240) == examples[:10]


def test_relative_spec_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "data" / "train.csv", "id,text,label\n1,good,positive\n")
    write(tmp_path / "specs" / "t.yaml", "name: t\ngroup: SC\ninstruction: x\nformat: csv\n"
                                         "labels: {negative: negative, positive: positive}\n"
                                         "splits: {train: ../data/train.csv}\n")
    monkeypatch.chdir(tmp_path)
    spec = load_task_spec("specs/t.yaml")
    saved = spec.to_dict()
    monkeypatch.chdir(tmp_path / "data")
    assert Path(saved["splits"]["train"]).is_absolute()
    assert [e.text for e in read_split(spec_from_dict(saved, source="elsewhere/expert.yaml"), "train")] == ["good"]


def test_data_folder_setting(tmp_path, monkeypatch):
    write(tmp_path / "mine" / "sst2" / "train.csv", "id,text,label_text\n1,fine film,positive\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    spec = load_task_spec(str(ROOT / "configs" / "real" / "sst2.yaml"), data_dir=str(tmp_path / "mine"))
    assert [e.text for e in read_split(spec, "train")] == ["fine film"]
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.chdir(tmp_path)  # no ../shared/realdata from here
    monkeypatch.setattr("memmcl.tasks.fields.default_data_dirs", lambda: [tmp_path / "absent"])
    unset = load_task_spec(str(ROOT / "configs" / "real" / "sst2.yaml"))
    with pytest.raises(TaskError, match=r"sst2.yaml: split .train. of task .sst2. is in the data folder .* memmcl data build .* set data_dir"):
        read_split(unset, "train")


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/realdata is not beside the project")
@pytest.mark.parametrize("spec_file", sorted((ROOT / "configs" / "real").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_real_task_reads(spec_file):
    spec = load_task_spec(str(spec_file), data_dir=os.environ.get(DATA_DIR_ENV, str(REAL_DATA)))
    data, leaked = read_task(spec)
    if spec.kind == "extraction":  # sizes of ../shared/realdata/README.md; every sentiment among the gold tuples
        # the standard dev splits repeat up to 3 train sentences ('Good food .'): logged, counted, kept
        assert leaked <= 3 and len(data["train"]) > 600 and 130 <= len(data["validation"]) <= 300
        assert {t[spec.task_kind.slots.index("sentiment")] for e in data["validation"] for t in e.tuples} == set(spec.labels)
        assert spec.group == "ABSA" and spec.metric == "tuple_f1"
        return
    assert leaked == 0 and len(data["train"]) > 1000 and 290 <= len(data["validation"]) <= 300
    assert set(Counter(e.label for e in data["validation"])) == set(range(spec.n_classes))
    assert (spec.aspect_field is not None) == all(e.aspect for e in data["train"][:50])

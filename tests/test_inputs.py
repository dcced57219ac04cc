"""Damaged or hostile inputs are named in one line, before expensive work: typed spec fields with a size bound, folders
where files belong, unreadable CSV rows, data that later phases could not use (checked by the data phase, before any
expert), wrong-shaped run files, and the errors of every verb."""

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from memmcl.cli import main
from memmcl.merging.search import MergeError, genome_problem, read_genome
from memmcl.merging.weak import WeakDataError, read_summary, summary_problem
from memmcl.pipeline import ExpertConfig, MergeConfig, Pipeline, TrainerConfig
from memmcl.report import ReportError, cell, write_report
from memmcl.rundir import RunDirError, RunLock, file_problem
from memmcl.tasks.readers import read_split, read_task
from memmcl.tasks.spec import TaskError, load_task_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "memmcl" / "tasks" / "embedded" / "sc_binary"


def spec_dict(**fields) -> dict:
    return {"name": "t", "group": "SC", "instruction": "Classify.", "labels": {"negative": "negative", "positive": "positive"},
            "splits": {s: str(EMBEDDED / f"{s}.jsonl") for s in ("train", "validation", "test")}, **fields}


def write_task(folder: Path, train: list[dict], test: list[dict] | None = None, **fields) -> Path:
    """A task spec in `folder` whose train (and test) rows are given; validation is the embedded sc_binary one."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        if rows is not None:
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = {"train": "train.jsonl", "validation": str(EMBEDDED / "validation.jsonl"),
              "test": "test.jsonl" if test is not None else str(EMBEDDED / "test.jsonl")}
    (folder / "t.yaml").write_text(yaml.safe_dump(spec_dict(splits=splits, **fields)))
    return folder / "t.yaml"


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "text": f"Sentence number {i} was {'good' if i % 2 else 'bad'}.",
             "label": "positive" if i % 2 else "negative"} for i in range(offset, offset + n)]


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """Runs `memmcl ARGS` in this process; returns (exit code, stderr lines)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines()


# ---- task specs and data files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("instruction", {"a": "b"}, "field 'instruction' is a dict; expected a string"),
    ("group", ["SC"], "field 'group' is a list; expected a string"),
    ("metric", 3, "field 'metric' is a int; expected a string"),
    ("name", {"x": 1}, "field 'name' is a dict; expected a task name"),
    ("labels", {"negative": ["no"], "positive": "yes"}, "field 'labels': 'negative' maps to a list"),
])
def test_a_spec_field_of_the_wrong_type_is_named(field, value, message):
    with pytest.raises(TaskError, match=rf"^<memory>: {message}"):
        spec_from_dict(spec_dict(**{field: value}))


def test_a_billion_laughs_field_is_refused_before_it_is_expanded(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 strings
    nested = "instruction:\n" + "\n".join("  " + line for line in lines) + "\n"
    path = tmp_path / "laughs.yaml"
    path.write_text(yaml.safe_dump(spec_dict()).replace("instruction: Classify.\n", nested))
    with pytest.raises(TaskError, match=rf"^{path}: field 'instruction' is too large"):
        load_task_spec(str(path))


def test_a_folder_given_as_a_spec_or_a_split_is_named(tmp_path):
    with pytest.raises(TaskError, match=rf"^{tmp_path}: a folder, not a task spec file"):
        load_task_spec(str(tmp_path))
    spec = spec_from_dict(spec_dict(splits={"train": str(tmp_path)}))
    with pytest.raises(TaskError, match=rf"^{tmp_path}: a folder, given as split 'train' of task 't'"):
        read_split(spec, "train")


def test_a_csv_field_past_the_csv_limit_is_named_with_its_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,positive\n" + "x" * 200_000 + ",negative\n")
    spec = spec_from_dict(spec_dict(format="csv", splits={"train": str(path)}))
    with pytest.raises(TaskError, match=rf"^{path}:3: not a readable CSV row \(field larger than field limit"):
        read_split(spec, "train")


def test_a_train_test_leak_is_logged_once_per_task(tmp_path, caplog):
    spec = load_task_spec(str(write_task(tmp_path, rows(6), rows(2, offset=4))))
    with caplog.at_level(logging.WARNING, logger="memmcl.tasks.readers"):
        for _ in range(3):  # every phase reads the data again
            assert read_task(spec)[1] == 2
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("task 't': 2 test example(s) also stand in train")


# ---- the data phase checks what later phases need ------------------------------------------------------------

def small(tmp_path, tiny_dir, spec: Path, **merge) -> Pipeline:
    return Pipeline(name="r", root=str(tmp_path / "runs"), backbone=str(tiny_dir), tasks=[str(spec), "irony"],
                    max_length=64, expert=ExpertConfig(lora_r=2, lora_alpha=4, max_epochs=1, max_train_examples=16),
                    merge=MergeConfig(population=2, generations=1, **merge), trainer=TrainerConfig(progress_bar=False))


def test_duplicate_ids_fail_in_the_data_phase_before_any_expert(tmp_path, tiny_dir):
    spec = write_task(tmp_path / "task", rows(8) + [{**rows(1)[0], "text": "Another one."}])
    with pytest.raises(WeakDataError, match=rf"^{spec}: split 'train' of task 't' holds id 'r0' more than once"):
        small(tmp_path, tiny_dir, spec).run()
    assert not (tmp_path / "runs" / "r" / "experts").exists()


def test_a_train_test_leak_fails_in_the_data_phase_unless_dropped(tmp_path, tiny_dir):
    spec = write_task(tmp_path / "task", rows(8), rows(3, offset=6))
    with pytest.raises(WeakDataError, match=r"2 training example\(s\) of task 't' have the content of a test example "
                                            r"\(e.g. id 'r6'\); deduplicate train against test, or set merge.on_test_overlap: drop"):
        small(tmp_path, tiny_dir, spec).run()
    assert not (tmp_path / "runs" / "r" / "experts").exists()
    assert "t" in small(tmp_path, tiny_dir, spec, on_test_overlap="drop").data_phase()


def test_cli_pipeline_on_bad_data_is_one_line_and_writes_no_config(tmp_path, capsys):
    spec = write_task(tmp_path / "task", rows(8), rows(3, offset=6))
    code, err = run_cli(["pipeline", "--config", str(ROOT / "configs/demo/pipeline.yaml"), "--root", str(tmp_path / "runs"),
                         "--tasks", f"[{spec}]"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"memmcl: error: {spec}: 2 training example(s) of task 't'")
    assert not (tmp_path / "runs" / "demo" / "config.yaml").exists()
    assert not (tmp_path / "runs" / "demo" / "experts").exists()


# ---- wrong-shaped run files ----------------------------------------------------------------------------------

def test_a_jsonl_output_is_checked_line_by_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": 1}\n[1, 2]\n')
    assert file_problem(path) == "corrupt (line 2 is not a JSON object)"
    path.write_text('{"id": 1}\n{"id": 2\n')
    assert file_problem(path) == "corrupt (JSONDecodeError)"


def test_a_weak_summary_of_the_wrong_shape_counts_as_empty(tmp_path):
    path = tmp_path / "summary.yaml"
    for text in ("42\n", "[1, 2]\n", "{not: yaml: here\n", "t: {train: x}\n"):
        path.write_text(text)
        assert read_summary(path) == {}
    assert summary_problem(42, ["t"]) == "a int, expected a mapping of task -> counts"
    assert summary_problem({"t": {"train": 3}}, ["t"]) == "task 't' has no counts ['train', 'wrong', 'low_margin', 'weak']"


@pytest.mark.parametrize("text, message", [
    ("coefficients: 3\n", "field 'coefficients' is not a mapping of expert name -> weight"),
    ("coefficients: {a: [1, x]}\n", "field 'coefficients' is not a mapping of expert name -> weight"),
    ("coefficients: {a: 1}\nstages: {SC: 5}\n", "field 'stages' is not a mapping of name -> {coefficients"),
    ("- 1\n", "a list, expected a mapping"),
    ("!!python/object/apply:os.system [touch ran]\n", "not a plain YAML genome file"),
])
def test_a_genome_file_of_the_wrong_shape_is_named(tmp_path, text, message):
    path = tmp_path / "best_genome.yaml"
    path.write_text(text)
    with pytest.raises(MergeError, match=rf"^{path}: {message}"):
        read_genome(path)
    assert genome_problem({"coefficients": {"a": [1.0, 0.5]}, "stages": {"SC": {"coefficients": {"a": 1}}}}) is None


def test_report_on_a_tagged_or_wrong_shaped_file_names_it(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("[]")
    with pytest.raises(ReportError, match=rf"^{tmp_path}/eval/results.json: a list; expected a dict"):
        write_report(tmp_path)
    (tmp_path / "eval" / "results.json").write_text("{}")
    (tmp_path / "merge").mkdir()
    (tmp_path / "merge" / "best_genome.yaml").write_text("!!python/object/apply:os.system [touch ran]\n")
    with pytest.raises(ReportError, match=rf"^{tmp_path}/merge/best_genome.yaml: not readable YAML"):
        write_report(tmp_path)
    assert cell("a|b <i>&") == "a\\|b &lt;i&gt;&amp;"


# ---- every verb: one line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, line", [
    (["fit", "--config", "configs/demo/expert.yaml", "--data.init_args.task", "nosuch"],
     "memmcl: error: task 'nosuch': not a YAML file and not a shipped task"),
    (["fit", "--config", "configs/demo/expert.yaml", "--model.init_args.adapter", "/no/such/adapter"],
     "memmcl: error: /no/such/adapter: no such expert directory"),
    (["test", "--config", "configs/demo/expert.yaml", "--trainer.devices", "0"],
     "memmcl: error: trainer: `Trainer(devices='0')` value is not a valid input using cpu accelerator"),
    (["merge", "--config", "configs/demo/merge.yaml", "--model.init_args.experts", "[/no/such/expert]"],
     "memmcl: error: /no/such/expert: no such expert directory"),
    (["report", "/no/such/run"], "memmcl: error: /no/such/run: no such run directory"),
])
def test_every_verb_prints_one_line_for_its_errors(args, line, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MEMMCL_VERBOSE", raising=False)
    code, err = run_cli(args, capsys)
    assert code == 2 and err[-1].startswith(line) and not any("Traceback" in e for e in err)


def test_an_unwritable_root_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEMMCL_VERBOSE", raising=False)
    (tmp_path / "file").write_text("not a folder")
    code, err = run_cli(["pipeline", "--config", str(ROOT / "configs/demo/pipeline.yaml"), "--tasks", "[sc_binary]",
                         "--root", str(tmp_path / "file")], capsys)
    assert code == 2 and err == [f"memmcl: error: {tmp_path}/file/demo: Not a directory"]


def test_a_missing_device_fails_before_the_data_phase(tmp_path):
    with pytest.raises(ValueError, match=r"^trainer: accelerator='cpu', devices=0, strategy='auto': `Trainer\(devices=0\)`"):
        Pipeline(name="r", root=str(tmp_path), tasks=["sc_binary"], trainer=TrainerConfig(devices=0))
    assert not (tmp_path / "r").exists()


def test_a_lock_held_by_a_live_unrelated_process_names_the_file_to_remove(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    with pytest.raises(RunDirError, match=rf"\(if pid {os.getppid()} is not a memmcl run, remove {tmp_path}/.lock\)$"):
        RunLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": "1; rm -rf /", "host": os.uname().nodename}))
    with RunLock(tmp_path) as lock:  # a crafted pid is not a holder: the lock is stale and taken over
        assert lock.held

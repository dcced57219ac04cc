"""A task's name is an identifier, never a path, and nothing the pipeline writes or removes leaves its run directory:
bad names fail where the spec is loaded, and a planted symlink is unlinked or refused, never followed."""

from pathlib import Path

import pytest
import yaml

from memmcl.expert_phase import EXPERT_OUTPUTS, expert_key
from memmcl.pipeline import Pipeline
from memmcl.rundir import RunDirError, clear, inside, sweep_temporaries
from memmcl.tasks.spec import TaskError, load_task_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SPECS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "splits" in yaml.safe_load(p.read_text()))


def task(name) -> dict:
    return {"name": name, "group": "SC", "instruction": "Classify.",
            "labels": {"negative": "negative", "positive": "positive"},
            "splits": {s: f"embedded:sc_binary/{s}.jsonl" for s in ("train", "validation", "test")}}


def planted(folder: Path) -> Path:
    """A folder outside the run directory holding one file: what no run may touch."""
    (folder / "keep.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("keep")
    return folder


def untouched(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["keep.txt"] and (folder / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("name", ["../../victim", "ABS", ".", "a/b", "..", "-x", ".hidden", "a b"])
def test_a_task_name_that_is_a_path_fails_at_load_before_anything_is_written(tmp_path, name):
    victim = planted(tmp_path / "victim")  # where `../../victim` and the absolute name lead from runs/r/experts
    name = str(victim) if name == "ABS" else name
    spec_file = tmp_path / "specs" / "t.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text(yaml.safe_dump(task(name)))
    with pytest.raises(TaskError) as err:
        Pipeline(name="r", root=str(tmp_path / "runs"), tasks=[str(spec_file)])
    assert str(err.value) == (f"{spec_file}: field 'name' is {name!r}; expected a task name of letters, digits, '_', "
                              f"'-', '.' (not leading '.' or '-')")
    assert not (tmp_path / "runs").exists() and untouched(victim)


@pytest.mark.parametrize("name", ["sc_binary", "sst-2", "v1.2", "_x", 2020])
def test_identifier_task_names_load(name):
    assert spec_from_dict(task(name)).name == str(name)


@pytest.mark.parametrize("spec_file", SHIPPED_SPECS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_task_spec_has_a_valid_name(spec_file):
    assert load_task_spec(str(spec_file)).name == yaml.safe_load(spec_file.read_text())["name"]


def test_inside_refuses_paths_that_lead_out_of_the_run_directory(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "experts").mkdir(parents=True)
    assert inside(run, "experts", "sc_binary", "expert") == run / "experts" / "sc_binary" / "expert"
    assert inside(run, "tensorboard", "experts/sc_binary") == run / "tensorboard" / "experts" / "sc_binary"
    for parts in [("experts", "../../victim"), ("experts", str(tmp_path / "victim")), ("experts", "."), ("..",), ()]:
        with pytest.raises(RunDirError, match="expected a path inside the run directory"):
            inside(run, *parts)
    (run / "data").symlink_to(planted(tmp_path / "outside"), target_is_directory=True)
    with pytest.raises(RunDirError, match=rf"runs/r/data/metadata.json: expected a path inside the run directory .*; "
                                          rf"it resolves to {tmp_path}/outside/metadata.json"):
        inside(run, "data", "metadata.json")


def test_clearing_a_phase_folder_never_follows_a_symlink_out(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "experts" / "irony").mkdir(parents=True)
    linked = planted(tmp_path / "linked")
    (run / "experts" / "sc_binary").symlink_to(linked, target_is_directory=True)  # the phase folder is a link
    inner = planted(tmp_path / "inner")
    (run / "experts" / "irony" / "escape").symlink_to(inner, target_is_directory=True)  # a link inside it
    clear(run, "experts", "sc_binary")
    clear(run, "experts", "irony")
    clear(run, "experts", "hate")  # not there: nothing to do
    assert list((run / "experts").iterdir()) == [] and untouched(linked) and untouched(inner)

    (run / "merge").symlink_to(planted(tmp_path / "merge_elsewhere"), target_is_directory=True)
    (tmp_path / "merge_elsewhere" / "stages").mkdir()
    with pytest.raises(RunDirError, match="it resolves to .*merge_elsewhere"):  # the folder holding it leads out
        clear(run, "merge", "stages")
    assert (tmp_path / "merge_elsewhere" / "stages").is_dir()
    with pytest.raises(RunDirError, match="expected a path inside the run directory"):
        clear(run, "experts", ".")
    assert (run / "experts").is_dir()


def test_a_rerun_unlinks_a_planted_expert_folder_link_and_leaves_its_target(tmp_path):
    run = Pipeline(name="r", root=str(tmp_path / "runs"), tasks=["sc_binary"])
    linked = planted(tmp_path / "linked")
    (run.run_dir / "experts").mkdir(parents=True)
    (run.run_dir / "experts" / "sc_binary").symlink_to(linked, target_is_directory=True)
    assert not run.start_training("expert:sc_binary", ("experts", "sc_binary"), expert_key(run, run.specs[0]),
                                  EXPERT_OUTPUTS)
    assert not (run.run_dir / "experts" / "sc_binary").exists() and untouched(linked)


def test_sweeping_temporaries_unlinks_a_linked_one(tmp_path):
    outside = planted(tmp_path / "outside")
    (tmp_path / "run" / "merge").mkdir(parents=True)
    (tmp_path / "run" / "merge" / ".merged.ab3_x9qz").symlink_to(outside, target_is_directory=True)
    assert sweep_temporaries(tmp_path / "run") == [tmp_path / "run" / "merge" / ".merged.ab3_x9qz"]
    assert untouched(outside)

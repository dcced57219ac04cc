"""A run directory you can trust: one writer (lock), workers that die with their parent, settings checked before the
first phase with one-line errors naming the field, and a search state that is data, never code."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memmcl.merging import evolution
from memmcl.pipeline import DemoConfig, ExpertConfig, MergeConfig, MultitaskConfig, Pipeline, PipelineError
from memmcl.rundir import RunDirError, RunLock, sweep_temporaries

ROOT = Path(__file__).resolve().parents[1]


def test_second_run_on_a_locked_directory_fails_naming_the_holder(tmp_path, tiny_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from memmcl.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path / "runs" / "r")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        run = Pipeline(name="r", root=str(tmp_path / "runs"), backbone=str(tiny_dir), tasks=["sc_binary"])
        with pytest.raises(RunDirError, match=rf"runs/r: another memmcl pipeline \(pid {holder.pid} on .*\) is using"):
            run.run()
        assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == [".lock"]  # nothing was started
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path / "runs" / "r") as lock:  # the killed holder's lock is stale: taken over
        assert lock.held
    assert not (tmp_path / "runs" / "r" / ".lock").exists()


def test_workers_die_with_their_parent(tmp_path):
    script = (
        "import os, time, concurrent.futures as cf, multiprocessing as mp\n"
        "from memmcl.rundir import init_worker\n"
        "if __name__ == '__main__':\n"
        "    pool = cf.ProcessPoolExecutor(2, mp_context=mp.get_context('spawn'), initializer=init_worker, initargs=(1,))\n"
        "    ready, deadline = set(), time.time() + 60\n"
        "    while len(ready) < 2 and time.time() < deadline:  # a worker that ran a job has run its initializer\n"
        "        ready |= {f.result() for f in [pool.submit(os.getpid) for _ in range(8)]}\n"
        "    jobs = [pool.submit(time.sleep, 120) for _ in range(2)]\n"
        "    time.sleep(1)\n"
        "    print(' '.join(str(p) for p in pool._processes), flush=True)\n"
        "    time.sleep(120)\n")
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waits for its reaper but runs no more
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("overrides, message", [
    ({"merge": MergeConfig(population=1)}, r"merge.population: expected an integer >= 2, got 1"),
    ({"merge": MergeConfig(generations=0)}, r"merge.generations: expected an integer >= 1, got 0"),
    ({"merge": MergeConfig(bounds=(2.0, 0.0))}, r"merge.bounds: expected \[low, high\] with low < high"),
    ({"merge": MergeConfig(sigma=-1)}, r"merge.sigma: expected a step size > 0, got -1"),
    ({"merge": MergeConfig(groups={"SC": ["sc_binary", "nope"]})}, r"merge.groups.SC: expected a non-empty list of tasks"),
    ({"merge": MergeConfig(groups={"../SC": ["sc_binary"]})}, r"merge.groups: expected group names of letters, digits"),
    ({"merge": MergeConfig(task_weights={"sc_binray": 1.0})}, r"merge.task_weights: expected task names among"),
    ({"difficulty_weights": {"expert_eror": 1.0}}, r"difficulty_weights: difficulty weights name unknown feature"),
    ({"demonstrations": DemoConfig(k=2, max_length=16)}, r"demonstrations.max_length: expected at least max_length"),
    ({"demonstrations": DemoConfig(select="similar", fixed=True)}, r"demonstrations.fixed: expected false with"),
    ({"expert": ExpertConfig(max_epochs=0)}, r"expert.max_epochs: expected an integer >= 1, got 0"),
    ({"expert": ExpertConfig(check_val_every_n_epoch=0)}, r"expert.check_val_every_n_epoch: expected an integer >= 1"),
    ({"multitask": MultitaskConfig(batch_size=0)}, r"multitask.batch_size: expected null or an integer >= 1, got 0"),
    ({"backbone": "./no/such/model"}, r"backbone: ./no/such/model: no such directory"),
])
def test_bad_setting_is_rejected_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline(name="bad", root=str(tmp_path), tasks=["sc_binary", "irony"], **overrides)
    assert not (tmp_path / "bad").exists()


def test_an_empty_task_list_is_an_error_not_every_task(tmp_path):
    with pytest.raises(PipelineError, match=r"^tasks: expected at least one shipped task name or task spec path, got \[\]"):
        Pipeline(name="bad", root=str(tmp_path), tasks=[])
    assert not (tmp_path / "bad").exists()


def test_cli_error_is_one_line_naming_the_field_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memmcl", "pipeline", "--config", "configs/demo/pipeline.yaml",
                           "--root", str(tmp_path), "--merge.population", "1"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MEMMCL_VERBOSE": "0"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "memmcl: error: merge.population: expected an integer >= 2, got 1"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_help_lists_every_verb_and_an_unknown_verb_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "memmcl", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["pipeline", "report", "data", "fit", "validate", "test", "predict", "merge"]
    proc = subprocess.run([sys.executable, "-m", "memmcl", "fti"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "memmcl: error: unknown verb 'fti'; expected one of pipeline, report, data, fit, validate, test, predict, merge")


def test_search_state_is_json_and_a_crafted_file_runs_nothing(tmp_path):
    state = evolution.new_state("cmaes", [0.5, 0.5], 0.3, 4, seed=0)
    for _ in range(2):
        population = evolution.propose(state, "cmaes", [0.5, 0.5], 0.3, 4)
        for ind in population:
            ind.fitness.values = (-sum((v - 0.8) ** 2 for v in ind),)
        evolution.tell(state, "cmaes", population, ([0.5, 0.5], -0.18))
        state["cache"][tuple(population[0])] = {"t": {"acc": 0.5}}
    again = evolution.load_state(evolution.dump_state(state), "state.json")
    assert again["cache"] == state["cache"] and again["best"] == state["best"]
    ahead = [list(i) for i in evolution.propose(state, "cmaes", [0.5, 0.5], 0.3, 4)]
    assert [list(i) for i in evolution.propose(again, "cmaes", [0.5, 0.5], 0.3, 4)] == ahead  # exact resume

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(ValueError, match=r"state.json: not a search state written by memmcl"):
        evolution.load_state(pickle.dumps(Payload()), "state.json")
    with pytest.raises(ValueError, match=r"state.json: not a search state written by memmcl \(expected keys"):
        evolution.load_state(b'{"__reduce__": ["os.system", "touch ran"]}', "state.json")
    assert not marker.exists()


def test_killed_writers_temporaries_are_swept(tmp_path):
    keep = [tmp_path / "merge" / ".phase.json", tmp_path / "merge" / ".started.json", tmp_path / ".lock",
            tmp_path / "merge" / "best_genome.yaml"]
    swept = [tmp_path / "merge" / ".merged.ab3_x9qz", tmp_path / "experts" / "irony" / ".expert.old.k2j4h5g6",
             tmp_path / "weak" / ".summary.yaml.tmp"]
    for path in keep + swept[2:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    for folder in swept[:2]:
        (folder / "inner").mkdir(parents=True)
        (folder / "inner" / "model.safetensors").write_text("half")
    assert sorted(sweep_temporaries(tmp_path)) == sorted(swept)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in swept)


def test_the_trainer_section_takes_lightnings_own_arguments(tmp_path):
    from memmcl.expert_phase import expert_key
    from memmcl.pipeline import TrainerConfig
    from memmcl.settings import PIPELINE_OWNED, TRAINER_ARGS

    assert {"num_nodes", "accumulate_grad_batches", "gradient_clip_val", "deterministic"} <= set(TRAINER_ARGS)
    assert not set(TRAINER_ARGS) & set(PIPELINE_OWNED)
    with pytest.raises(TypeError):  # each phase sets its own epochs
        TrainerConfig(max_epochs=3)
    plain = Pipeline(name="r", root=str(tmp_path), tasks=["sc_binary"])
    run = Pipeline(name="r", root=str(tmp_path), tasks=["sc_binary"],
                   trainer=TrainerConfig(accumulate_grad_batches=4, gradient_clip_val=1.0))
    trainer = run.trainer(None)
    assert trainer.accumulate_grad_batches == 4 and trainer.gradient_clip_val == 1.0
    assert plain.trainer(None).accumulate_grad_batches == 1
    assert expert_key(run, run.specs[0]) != expert_key(plain, plain.specs[0])  # it changes what an expert learns
    with pytest.raises(PipelineError, match=r"^trainer: .*num_nodes"):
        Pipeline(name="r", root=str(tmp_path), tasks=["sc_binary"], trainer=TrainerConfig(num_nodes=0))


def test_a_setting_added_later_keeps_earlier_keys_at_its_default():
    from memmcl.rundir import added_setting, added_settings, config_hash

    before = config_hash(["backbone", {"lr": 0.1}])
    assert config_hash(["backbone", *added_setting(None, None), {"lr": 0.1}]) == before
    assert config_hash(["backbone", *added_setting(7, None), {"lr": 0.1}]) != before
    assert added_setting(3, 0, "seed") == [{"seed": 3}] and added_setting(0, 0, "seed") == []
    assert added_settings({"lr": 0.1, "batch_size": None}, batch_size=None) == {"lr": 0.1}
    assert added_settings({"lr": 0.1, "batch_size": 4}, batch_size=None) == {"lr": 0.1, "batch_size": 4}

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from memmcl.expert_phase import expert_key
from memmcl.merging.search import MergeSearch
from memmcl.pipeline import DemoConfig, ExpertConfig, MergeConfig, MultitaskConfig, Pipeline, TrainerConfig
from memmcl.report import ReportError, write_report
from memmcl.roster import CLAIMS

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sc_binary", "sc_3class", "irony"]  # SC + MAST: group searches and the global one


def pipeline(tmp_path, tiny_dir, generations=2):
    return Pipeline(
        name="small", root=str(tmp_path), backbone=str(tiny_dir), tasks=TASKS, max_length=64,
        expert=ExpertConfig(lora_r=2, lora_alpha=4, max_epochs=2, batch_size=8, max_train_examples=24, demonstrations=2),
        merge=MergeConfig(population=4, generations=generations, max_weak_examples=12, min_weak_examples=8),
        demonstrations=DemoConfig(k=2, max_length=160, seeds=2), trainer=TrainerConfig(progress_bar=False),
        multitask=MultitaskConfig(pacings=["none", "root"], max_epochs=2))


class Killed(RuntimeError):
    pass


def test_killed_pipeline_resumes_with_finished_phases_skipped(tmp_path, tiny_dir, monkeypatch):
    def kill(self, stage, generation):
        if stage == "MAST" and generation == 1:
            raise Killed
    resume = MergeSearch.after_generation
    monkeypatch.setattr(MergeSearch, "after_generation", kill)
    first = pipeline(tmp_path, tiny_dir)
    with pytest.raises(Killed):
        first.run()
    assert not (tmp_path / "small" / "merge" / ".phase.json").exists()
    # not monkeypatch.undo(): that would also undo conftest's float32 default, so a bf16 CPU would change every key
    monkeypatch.setattr(MergeSearch, "after_generation", resume)
    second = pipeline(tmp_path, tiny_dir)
    results = second.run()
    skipped = {p for p, r in second.phases.items() if r["skipped"]}
    assert skipped == {"data", "expert:sc_binary", "expert:sc_3class", "expert:irony", "weak", "difficulty",
                       "multitask:multitask", "multitask:multitask+curriculum"}
    assert second.phases["merge"]["resumed"] is True
    run = tmp_path / "small"
    history = yaml.safe_load((run / "merge" / "stages" / "MAST" / "result.yaml").read_text())["history"]
    assert [h["generation"] for h in history] == [1, 2]  # generation 1 came from the killed run's saved state

    # every model of the evaluation matrix, on every task's test split
    models = results["models"]
    assert set(models) == {"base", "uniform", "task_arithmetic", "evolved_SC", "evolved_MAST", "evolved_global", "expert",
                           "evolved_global+icl", "evolved_global+icl_random", "evolved_global+icl_reverse",
                           "multitask", "multitask+curriculum"}
    icl = results["icl"]  # the order ablation: zero-shot, then each order over 2 demonstration seeds
    assert list(icl) == ["none", "curriculum", "random", "reverse"] and len(icl["reverse"]["per_seed"]) == 2
    assert icl["none"]["mean"] == pytest.approx(results["means"]["evolved_global"]["overall"])
    assert icl["reverse"]["mean"] == pytest.approx(results["means"]["evolved_global+icl_reverse"]["overall"])
    genome = yaml.safe_load((tmp_path / "small" / "merge" / "best_genome.yaml").read_text())
    ta = genome["baselines"]["task_arithmetic"]
    assert ta["fitness"] == max(ta["fitness_by_scale"].values()) and set(ta["coefficients"]["irony"]) == {ta["scale"]}
    # the curriculum opened the easiest task first, so its adapter differs from the one trained on all tasks at once
    adapters = [(tmp_path / "small" / "multitask" / v / "expert" / "adapter_model.safetensors").read_bytes()
                for v in ("multitask", "multitask+curriculum")]
    assert adapters[0] != adapters[1]
    assert all(set(models[m]) == set(TASKS) for m in models)
    assert results["means"]["evolved_global"]["overall"] == pytest.approx(
        sum(models["evolved_global"][t]["acc"] for t in TASKS) / 3)
    report = (run / "report" / "report.md").read_text()
    assert "| **mean SC** | SC |" in report and "evolved global merge" in report and "multi-task LoRA + curriculum" in report
    assert "| reverse |" in report  # the ablation table
    # every claimed difference: A − B of the mean accuracies above, per-example correctness kept for each model
    assert {(d["a"], d["b"]) for d in results["differences"]} == set(CLAIMS)
    for d in results["differences"]:
        means = results["means"]
        assert d["diff"] == pytest.approx(means[d["a"]]["overall"] - means[d["b"]]["overall"], abs=1e-6)
        assert d["low"] <= d["high"] and d["resamples"] == 1000
    assert set(results["correct"]) == set(models) and len(results["correct"]["evolved_global+icl"]["irony"]) == 2
    assert "## Which differences are real" in report and "| global + curriculum ICL − evolved global merge |" in report
    assert {p.name for p in (run / "report").glob("*.png")} == {"accuracy.png", "merge_weights.png", "fitness.png", "difficulty.png"}
    difficulty = json.loads((run / "difficulty" / "difficulty.json").read_text())
    assert sorted(difficulty["order"]) == sorted(TASKS) and "expert_error" in difficulty["weights"]
    assert (run / "tensorboard" / "experts" / "irony").is_dir() and (run / "tensorboard" / "merge").is_dir()

    # a changed merge setting re-runs merge and evaluation, not the experts
    third = pipeline(tmp_path, tiny_dir, generations=3)
    third.run()
    ran = {p for p, r in third.phases.items() if not r["skipped"]}
    assert ran == {"merge", "eval"}
    assert third.phases["merge"]["resumed"] is False

    # a corrupt output of a finished phase is named and the phase redone; the seeded retrain is bit-identical, so
    # nothing downstream changes and the results are byte-identical
    before = (run / "eval" / "results.json").read_bytes()
    adapter = run / "experts" / "irony" / "expert" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    (run / "eval" / ".phase.json").write_text("{not json")
    fourth = pipeline(tmp_path, tiny_dir, generations=3)
    fourth.run()
    assert {p for p, r in fourth.phases.items() if not r["skipped"]} == {"expert:irony", "eval"}
    assert (run / "eval" / "results.json").read_bytes() == before

    # a replaced adapter re-runs what consumed it (weak data, merge, evaluation), not the experts
    from safetensors.torch import load_file, save_file

    replaced = run / "experts" / "sc_binary" / "expert" / "adapter_model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(str(replaced)).items()}, str(replaced))
    fifth = pipeline(tmp_path, tiny_dir, generations=3)
    fifth.run()
    ran = {p for p, r in fifth.phases.items() if not r["skipped"]}
    assert {"weak", "merge", "eval"} <= ran and not any(p.startswith("expert:") for p in ran)

    # wrong-shaped files that parse (a weak summary, a weak JSONL line, the genome) and an expert.yaml that records a
    # training file other than the spec's: each is named, its phase redone, and the results stay byte-identical
    before = (run / "eval" / "results.json").read_bytes()
    (run / "weak" / "summary.yaml").write_text("42\n")
    with (run / "weak" / "irony.jsonl").open("a") as f:
        f.write("[1, 2]\n")
    (run / "merge" / "best_genome.yaml").write_text("coefficients: 3\n")
    recorded = run / "experts" / "sc_3class" / "expert" / "expert.yaml"
    meta = yaml.safe_load(recorded.read_text())
    meta["tasks"][0]["splits"]["train"] = str(tmp_path / "elsewhere.jsonl")
    recorded.write_text(yaml.safe_dump(meta))
    sixth = pipeline(tmp_path, tiny_dir, generations=3)
    sixth.run()
    assert {p for p, r in sixth.phases.items() if not r["skipped"]} == {"expert:sc_3class", "weak", "merge"}
    assert yaml.safe_load(recorded.read_text())["tasks"][0]["splits"]["train"].endswith("sc_3class/train.jsonl")
    assert (run / "eval" / "results.json").read_bytes() == before


def test_report_names_what_is_missing(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ReportError, match=r"eval/results.json: missing"):
        write_report(tmp_path / "run")
    with pytest.raises(ReportError, match="no such run directory"):
        write_report(tmp_path / "nowhere")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").rglob("pipeline*.yaml")) + sorted((ROOT / "configs").rglob("byo*.yaml")),
                         ids=lambda p: p.name)
def test_pipeline_configs_build(config, tiny_dir, monkeypatch):
    """Every pipeline YAML builds a Pipeline: all settings checked, every task spec read (the bring-your-own example
    gets a backbone that exists here for its placeholder)."""
    from memmcl.cli import build_pipeline

    monkeypatch.chdir(ROOT)
    extra = ["--backbone", str(tiny_dir)] if config.name.startswith("byo") else []
    if "accelerator: gpu" in config.read_text() and not torch.cuda.is_available():  # a Trainer is built to check it
        extra += ["--trainer.accelerator", "cpu"]
    text = config.read_text()
    if "configs/real/" in text and not REAL_DATA.is_dir():
        pytest.skip("../shared/realdata is not beside the project")
    _, cfg, built = build_pipeline(["--config", str(config), *extra])
    assert [s.name for s in built.specs] and built.merge.population >= 2
    assert len(built.specs) == len(cfg.tasks or built.specs)


def test_saved_run_config_starts_the_same_run(tiny_dir, monkeypatch, tmp_path):
    """A run directory's config.yaml keeps null settings (`stop_at_accuracy: null` is not the default 0.97), so a
    pipeline started from it has the same settings and expert keys."""
    from memmcl.cli import build_pipeline, save_config

    monkeypatch.chdir(ROOT)
    parser, cfg, first = build_pipeline(["--config", "configs/smollm2/pipeline_synthetic.yaml", "--backbone",
                                         str(tiny_dir)])
    assert first.expert.stop_at_accuracy is None
    save_config(parser, cfg, tmp_path / "config.yaml")
    _, _, again = build_pipeline(["--config", str(tmp_path / "config.yaml")])
    assert again.expert == first.expert and again.merge == first.merge and again.demos == first.demos
    assert [expert_key(again, s) for s in again.specs] == [expert_key(first, s) for s in first.specs]


@pytest.mark.parametrize("config", ["expert.yaml", "multitask.yaml"])
def test_fit_configs_build_model_data_and_callbacks(config, monkeypatch, tmp_path):
    from memmcl.cli import MemmclCLI
    from memmcl.experts.expert import LoRAExpert

    monkeypatch.chdir(ROOT)
    cli = MemmclCLI(args=["--config", str(ROOT / "configs" / "demo" / config), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model, LoRAExpert) and cli.datamodule.task_names
    if config == "multitask.yaml":
        assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ == "CurriculumSampler"]


REAL_DATA = ROOT.parent / "shared" / "realdata"


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/realdata is not beside the project")
def test_real_tasks_given_by_relative_spec_paths_run_from_another_directory(tmp_path, tiny_dir, monkeypatch):
    """Two real tasks (SC classification, ABSA extraction) through experts, weak data, merges and evaluation, specs
    named relative to a working
    directory the run then leaves; weak data comes from the capped training sample the experts saw."""
    start = tmp_path / "project"
    start.mkdir()
    monkeypatch.chdir(start)
    tasks = [os.path.relpath(ROOT / "configs" / "real" / f"{t}.yaml", start) for t in ("sst2", "uabsa_rest14")]
    assert not Path(tasks[0]).is_absolute()
    run = Pipeline(name="real", root=str(tmp_path / "runs"), backbone=str(tiny_dir), tasks=tasks, max_length=256,
                   max_eval_examples=20, data_dir=str(REAL_DATA),
                   expert=ExpertConfig(lora_r=2, lora_alpha=4, max_epochs=1, batch_size=8, max_train_examples=24),
                   merge=MergeConfig(population=2, generations=1, max_weak_examples=8, min_weak_examples=4),
                   demonstrations=DemoConfig(k=0), trainer=TrainerConfig(progress_bar=False))
    monkeypatch.chdir(tmp_path)  # saved expert specs must not depend on where the run started
    results = run.run()
    assert set(results["models"]["evolved_global"]) == {"sst2", "uabsa_rest14"}
    assert all(r["acc"] >= 0 for m in results["models"].values() for r in m.values())
    weak = yaml.safe_load((tmp_path / "runs" / "real" / "weak" / "summary.yaml").read_text())
    assert {t: weak[t]["train"] for t in ("sst2", "uabsa_rest14")} == {"sst2": 24, "uabsa_rest14": 24}
    losses = json.loads((tmp_path / "runs" / "real" / "weak" / "sst2.example_loss.json").read_text())
    assert len(losses) == 24 and all(i.startswith("sst-train-") for i in losses)
    saved = yaml.safe_load((tmp_path / "runs" / "real" / "experts" / "sst2" / "expert" / "expert.yaml").read_text())
    assert Path(saved["tasks"][0]["splits"]["train"]) == (REAL_DATA / "sst2" / "train.csv").resolve()


def test_a_phase_gets_the_same_threads_fresh_or_on_resume():
    """A phase's thread count depends on the whole set of phases, not on how many are left: a retrain on resume (one
    phase left, run here) or a resume with fewer phases left than workers does a fresh run's arithmetic."""
    from types import SimpleNamespace

    from memmcl.workers import phase_threads, worker_threads

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        p = SimpleNamespace(expert=SimpleNamespace(workers=4), trainer_config=TrainerConfig())
        assert [phase_threads(p, total) for total in (1, 2, 3, 4, 9)] == [4, 2, 1, 1, 1]
        with worker_threads(p, total=2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 4
        p.expert.workers = 1  # no workers: the caller's threads
        with worker_threads(p, total=2):
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)

import json

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from memmcl.bootstrap import paired_bootstrap
from memmcl.datamodule import MultiTaskDataModule
from memmcl.evaluation import claimed_differences, decode_correct, encode_correct
from memmcl.experts.expert import LoRAExpert
from memmcl.report import write_report
from memmcl.tasks.spec import load_task_specs


def brute_force_interval(a: dict, b: dict, seed: int, resamples: int) -> tuple[float, float, float]:
    """Mean and 2.5 / 97.5 percentiles of the resampled A − B, one resample at a time, from the documented draws."""
    rng = np.random.default_rng(seed)
    indices = {t: rng.integers(0, len(a[t]), size=(resamples, len(a[t]))) for t in sorted(a)}
    diffs = []
    for r in range(resamples):
        per_task = []
        for t in sorted(a):
            rows = indices[t][r]
            per_task.append(sum(a[t][i] for i in rows) / len(rows) - sum(b[t][i] for i in rows) / len(rows))
        diffs.append(sum(per_task) / len(per_task))
    return float(np.mean(diffs)), *np.percentile(diffs, [2.5, 97.5])


def test_paired_interval_matches_a_loop_over_the_same_draws():
    rng = np.random.default_rng(0)
    b = {"sst2": list(rng.integers(0, 2, 100)), "irony": list(rng.integers(0, 2, 40))}
    a = {"sst2": list(b["sst2"]), "irony": list(b["irony"])}
    for i in range(10):  # A right and B wrong on 10 of sst2's 100 rows: +0.10 on sst2, +0.05 over the two tasks
        b["sst2"][i], a["sst2"][i] = 0, 1
    result = paired_bootstrap(a, b, seed=7, resamples=300)
    assert result.diff == pytest.approx(0.05, abs=1e-12)
    _, low, high = brute_force_interval(a, b, seed=7, resamples=300)
    assert (result.low, result.high) == pytest.approx((low, high), abs=1e-12)
    # a paired difference of 10 in 100 rows: binomial sd sqrt(0.1 · 0.9 / 100) = 0.03 on sst2, halved over two tasks
    assert result.low == pytest.approx(0.05 - 1.96 * 0.015, abs=0.01) and result.excludes_zero
    assert result.to_dict()["excludes_zero"] is True

    one_task = paired_bootstrap({"sst2": a["sst2"]}, {"sst2": b["sst2"]}, seed=1)
    assert one_task.diff == pytest.approx(0.10, abs=1e-12) and one_task.resamples == 1000
    assert one_task.low < 0.10 < one_task.high


def test_identical_models_differ_by_exactly_zero():
    a = {"sst2": [1, 0, 1, 1, 0] * 20, "irony": [0, 1] * 10}
    result = paired_bootstrap(a, a, seed=3)
    assert (result.diff, result.low, result.high) == (0.0, 0.0, 0.0) and not result.excludes_zero


def test_mismatched_inputs_name_the_task():
    with pytest.raises(ValueError, match="tasks"):
        paired_bootstrap({"sst2": [1]}, {"irony": [1]}, seed=0)
    with pytest.raises(ValueError, match="'sst2': shapes"):
        paired_bootstrap({"sst2": [1, 0]}, {"sst2": [1]}, seed=0)


def test_correctness_strings_align_by_id_and_average_over_draws():
    draws = {"base": [{"sst2": {"a": False, "b": True}}],
             "evolved_global+icl": [{"sst2": {"a": True, "b": True}}, {"sst2": {"a": False, "b": True}}]}
    correct = encode_correct(draws)
    assert correct == {"base": {"sst2": ["01"]}, "evolved_global+icl": {"sst2": ["11", "01"]}}
    assert decode_correct(correct["evolved_global+icl"]["sst2"]).tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="model 'expert', task 'sst2'"):
        encode_correct({**draws, "expert": [{"sst2": {"a": True, "c": True}}]})
    # only the claims whose two models were evaluated
    correct["evolved_global"] = {"sst2": ["01"]}
    differences = claimed_differences(correct, seed=0, resamples=50)
    assert [(d["a"], d["b"]) for d in differences] == [("evolved_global+icl", "evolved_global")]
    assert differences[0]["diff"] == pytest.approx(0.25) and differences[0]["seed"] == 0


def minimal_run(run, differences):
    """The files `write_report` reads, for two tasks and three models."""
    groups = {"sst2": "SC", "irony": "MAST"}
    models = {m: {t: {"acc": acc, "f1": acc} for t in groups}
              for m, acc in (("base", 0.5), ("uniform", 0.6), ("evolved_global", 0.7))}
    results = {"models": models, "groups": groups, "majority": {t: 0.5 for t in groups}, "icl": {},
               "differences": differences}
    for path, data in ((run / "eval" / "results.json", results),
                       (run / "difficulty" / "difficulty.json",
                        {"order": list(groups), "scores": {"sst2": -1.0, "irony": 1.0}, "weights": {"expert_error": 1.0},
                         "normalised": {"sst2": {"expert_error": -1.0}, "irony": {"expert_error": 1.0}}})):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    (run / "merge").mkdir()
    (run / "merge" / "best_genome.yaml").write_text(yaml.safe_dump({
        "backbone": "tiny", "method": "linear", "coefficients": {"sst2": [0.5], "irony": [0.7]},
        "stages": {"global": {"members": ["SC", "MAST"], "uniform_fitness": 0.6, "fitness": 0.7,
                              "coefficients": {"sst2": [0.5], "irony": [0.7]}}}}))


def test_report_renders_the_difference_table(tmp_path):
    differences = [{"a": "evolved_global", "b": "uniform", "diff": 0.1, "low": 0.04, "high": 0.16,
                    "excludes_zero": True, "resamples": 1000, "seed": 0},
                   {"a": "expert", "b": "base", "diff": -0.02, "low": -0.08, "high": 0.03,
                    "excludes_zero": False, "resamples": 1000, "seed": 0}]
    minimal_run(tmp_path / "run", differences)
    report = write_report(tmp_path / "run").read_text()
    assert "## Which differences are real" in report and "1000 resamples (seed 0)" in report
    assert "| evolved global merge − uniform merge | +0.100 | [+0.040, +0.160] | ✓ |" in report
    assert "| expert − base (zero-shot) | -0.020 | [-0.080, +0.030] |  |" in report

    minimal_run(tmp_path / "older", [])  # a run without intervals: no section
    assert "Which differences" not in write_report(tmp_path / "older").read_text()


def test_per_example_correctness_agrees_with_accuracy(tiny_dir):
    torch.manual_seed(0)
    expert = LoRAExpert(backbone=str(tiny_dir), lora_r=2, target_modules=["q_proj", "v_proj"])
    for name, p in expert.model.named_parameters():  # peft's B = 0 init would make the adapter the base model
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    specs = load_task_specs(["sc_binary", "irony"])
    dm = MultiTaskDataModule(specs, backbone=str(tiny_dir), max_length=64, eval_batch_size=7, max_eval_examples=20)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.test(expert.eval(), datamodule=dm, verbose=False)
    correct = expert.correct["test"]
    assert set(correct) == {"sc_binary", "irony"}
    for task, hits in correct.items():
        assert list(hits) == sorted(e.id for e in dm.examples[task]["test"])  # every test example once, in id order
        assert sum(hits.values()) / len(hits) == pytest.approx(expert.results["test"][task]["acc"], abs=1e-6)


def test_the_roster_labels_every_model_the_pipeline_can_name():
    from memmcl.roster import FINAL, columns, label, variant_name

    names = ["base", "evolved_SC", FINAL, "multitask", variant_name("root"), variant_name("linear"), f"{FINAL}+icl"]
    assert columns(names) == ["base", "evolved_group", FINAL, "multitask", "multitask+curriculum",
                              "multitask+curriculum_linear", f"{FINAL}+icl"]
    assert label(variant_name("linear")) == "multi-task LoRA + curriculum (linear)"  # the report no longer drops it
    assert label(FINAL) == "evolved global merge"

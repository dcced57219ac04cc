"""Tangent-space experts: Jacobians, training, saving, and the merge search scoring them in the tangent model."""

import json

import lightning as L
import pytest
import torch

from memmcl.datamodule import MultiTaskDataModule
from memmcl.experts.expert import LoRAExpert
from memmcl.experts.expert_io import ExpertError
from memmcl.experts.scoring import continuation_rows, score_labels
from memmcl.experts.tangent import TangentExpert, clear_jacobians
from memmcl.merging.factors import MergeError
from memmcl.merging.search import MergeSearch
from memmcl.pipeline import ExpertConfig, MergeConfig, Pipeline, PipelineError
from memmcl.tasks.spec import load_task_spec

TASKS = ["sc_binary", "sc_5class", "irony"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def items(tiny_dir, task, split="train", n=12):
    dm = MultiTaskDataModule([load_task_spec(task)], backbone=str(tiny_dir), max_length=96, seed=0)
    dm.setup()
    chosen = dm.items[split][:n]
    return [it["prompt"] for it in chosen], [it["answers"] for it in chosen]


def expert(tiny_dir, **kw) -> TangentExpert:
    return TangentExpert(backbone=str(tiny_dir), lora_r=2, lora_alpha=4, target_modules=TARGETS, **kw)


def scores_with_delta(e: TangentExpert, b: torch.Tensor, prompts, answers) -> torch.Tensor:
    """Label scores of the network with ΔW = scale · B A0 inside it (the model the tangent model linearises)."""
    rows = torch.tensor([i for i, _ in continuation_rows(answers)], dtype=torch.long)
    for layer, (_, factor) in zip(e.space.layers.values(), e.space.factors(b).values(), strict=True):
        layer.per_example, layer.continuation_example, layer.calls = factor.expand(len(prompts), -1, -1), rows, 0
    try:
        return score_labels(e.model, prompts, answers, e.pad_id, share_prefix=False, chunk_size=len(prompts))
    finally:
        for layer in e.space.layers.values():
            layer.per_example = None


@pytest.mark.parametrize("multi_token", [False, True])
def test_jacobians_are_the_derivative_of_the_label_scores(tiny_dir, multi_token):
    clear_jacobians()
    e = expert(tiny_dir)
    prompts, answers = items(tiny_dir, "sc_5class")
    if multi_token:  # answers of several tokens, two sharing a continuation, continue the prompts in extra rows
        answers = [[[40, 41, 42], [40, 41, 43], [44], [45, 46 + i % 3]] for i in range(len(prompts))]
    pairs = e.space.jacobians(prompts, answers, e.pad_id)
    base = score_labels(e.model, prompts, answers, e.pad_id)
    assert torch.allclose(torch.stack([s for s, _ in pairs]), base, atol=1e-4)
    torch.manual_seed(0)
    b = torch.randn(e.space.n_params) * 0.05
    eps = 1e-2
    finite = (scores_with_delta(e, eps * b, prompts, answers) - scores_with_delta(e, -eps * b, prompts, answers)) / (2 * eps)
    linear = torch.stack([j @ b for _, j in pairs])
    assert torch.allclose(finite, linear, atol=2e-3 * linear.abs().max())
    # prompts in a batch get the same rows as one at a time
    clear_jacobians()
    alone = [e.space.jacobians([p], [a], e.pad_id)[0][1] for p, a in zip(prompts[:3], answers[:3], strict=True)]
    assert all(torch.allclose(x, y, atol=1e-5) for x, (_, y) in zip(alone, pairs[:3], strict=True))


def test_training_fits_the_task_and_the_penalty_keeps_other_tasks_still(tiny_dir, tmp_path):
    spec = load_task_spec("irony")
    dm = MultiTaskDataModule([spec], backbone=str(tiny_dir), max_length=96, seed=0, batch_size=16,
                             max_train_examples=48, max_eval_examples=16)
    off_prompts, off_answers = items(tiny_dir, "sc_5class", n=16)
    shifts = {}
    for weight in (0.0, 10.0):
        L.seed_everything(0)
        e = expert(tiny_dir, off_task_weight=weight, lr=0.05, export_dir=str(tmp_path / f"expert{weight}"))
        e.set_off_task({"sc_5class": list(zip(off_prompts, off_answers, strict=True))})
        trainer = L.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(e, dm)
        assert (tmp_path / f"expert{weight}" / "expert.yaml").exists()  # fit exports the expert where it was told
        _, jac, _ = e._stack(off_prompts, off_answers)
        shift = jac @ e.b.detach()
        shifts[weight] = (shift - shift.mean(-1, keepdim=True)).pow(2).mean().item()
        train = dm.items["train"]
        scores = e.predict_scores({"prompt": [it["prompt"] for it in train], "answers": [it["answers"] for it in train]})
        gold = torch.tensor([it["label"] for it in train])
        flipped = e.predict_scores({"prompt": [it["prompt"] for it in train[::-1]],
                                    "answers": [it["answers"] for it in train[::-1]]})
        assert torch.equal(flipped, scores.flip(0))  # a batch of the same prompts in another order: rows follow it
        base = e.predict_scores({"prompt": [it["prompt"] for it in train], "answers": [it["answers"] for it in train]},
                                b=torch.zeros_like(e.b))
        ce = torch.nn.functional.cross_entropy
        if weight == 0:  # fitted: the training loss falls well below the base model's
            assert ce(scores, gold) < 0.8 * ce(base, gold)
    assert shifts[10.0] < 0.5 * shifts[0.0]


@pytest.fixture(scope="module")
def tangent_experts(tiny_dir, tmp_path_factory):
    """Tangent experts with random B, saved as the pipeline saves them."""
    root = tmp_path_factory.mktemp("tangent")
    dirs = []
    for i, task in enumerate(TASKS):
        e = expert(tiny_dir)
        torch.manual_seed(i)
        with torch.no_grad():
            e.b.normal_(std=0.3)
        e.specs = [load_task_spec(task)]
        dirs.append(str(e.save_expert(root / task)))
    return dirs


def test_saved_tangent_expert_is_marked_and_not_loaded_as_a_lora_network(tangent_experts):
    with pytest.raises(ExpertError, match="an expert of kind .tangent."):
        LoRAExpert(adapter=tangent_experts[0], backbone="tiny")


def test_merge_search_scores_the_tangent_model(tiny_dir, tangent_experts, tmp_path):
    search = MergeSearch(experts=tangent_experts, out_dir=str(tmp_path), evaluate_test=False)
    assert search.kind.name == "tangent"
    prompts, answers = items(tiny_dir, "sc_5class", split="test", n=6)
    # the expert's own scorer (reverse-mode Jacobians) and the search's (forward-mode AD) agree
    e = expert(tiny_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        e.b.normal_(std=0.3)  # expert 1 of the fixture
    onehot = torch.tensor([[0.0, 1.0, 0.0]])
    search.set_coefficients(onehot)
    direct = search.kind_scorer.scores(prompts, answers)
    batch = {"prompt": prompts, "answers": answers}
    assert torch.allclose(direct, e.predict_scores(batch), atol=1e-3)
    # linear in the genome, and the cached per-expert shifts give the same scores as a pass along the merge
    genome = torch.tensor([[0.7, -0.4, 1.3]])
    search.set_coefficients(genome)
    along = search.kind_scorer.scores(prompts, answers)
    with search.cached_shifts():
        cached = search.kind_scorer.scores(prompts, answers)
    assert torch.allclose(along, cached, atol=1e-3)
    search.set_coefficients(torch.zeros(1, 3))
    base = search.kind_scorer.scores(prompts, answers)
    parts = []
    for t in range(3):
        unit = torch.zeros(1, 3)
        unit[0, t] = genome[0, t]
        search.set_coefficients(unit)
        parts.append(search.kind_scorer.scores(prompts, answers) - base)
    assert torch.allclose(base + sum(parts), along, atol=1e-3)
    assert not torch.allclose(along, base, atol=1e-2)
    # kept shifts (reverse mode, per block and expert) equal forward-mode passes for per-block genomes too
    blocks = MergeSearch(experts=tangent_experts, out_dir=str(tmp_path / "blocks"), evaluate_test=False, blocks=2)
    genome = torch.tensor([[0.7, -0.4, 1.3], [0.2, 0.9, -0.6]])
    blocks.set_coefficients(genome)
    along = blocks.kind_scorer.scores(prompts, answers)
    with blocks.cached_shifts():
        assert torch.allclose(along, blocks.kind_scorer.scores(prompts, answers), atol=1e-3)


def test_tangent_and_lora_experts_do_not_mix(tiny_dir, tangent_experts, tmp_path):
    lora = LoRAExpert(backbone=str(tiny_dir), lora_r=2, target_modules=TARGETS)
    lora.specs = [load_task_spec("hate")]
    plain = str(lora.save_expert(tmp_path / "hate"))
    with pytest.raises(MergeError, match="mixed"):
        MergeSearch(experts=[*tangent_experts, plain], out_dir=str(tmp_path / "m"))
    with pytest.raises(MergeError, match="linear"):
        MergeSearch(experts=tangent_experts, out_dir=str(tmp_path / "m"), method="ties")


def test_pipeline_rejects_a_folding_method_with_tangent_experts(tmp_path):
    with pytest.raises(PipelineError, match="merge.method"):
        Pipeline(root=str(tmp_path), tasks=TASKS, expert=ExpertConfig(kind="tangent"), merge=MergeConfig(method="ties"))


def test_pipeline_with_tangent_experts_runs_end_to_end(tmp_path, tiny_dir):
    from memmcl.pipeline import DemoConfig, MultitaskConfig, TrainerConfig

    run = Pipeline(name="tangent", root=str(tmp_path), backbone=str(tiny_dir), tasks=TASKS, max_length=64,
                   max_eval_examples=12,
                   expert=ExpertConfig(kind="tangent", lora_r=2, lora_alpha=4, target_modules=TARGETS, lr=0.05,
                                       max_epochs=3, check_val_every_n_epoch=2, batch_size=64, max_train_examples=24,
                                       off_task_prompts=4),
                   multitask=MultitaskConfig(pacings=["none"], max_epochs=1, batch_size=8),
                   merge=MergeConfig(population=3, generations=1, max_weak_examples=6, min_weak_examples=4),
                   demonstrations=DemoConfig(k=1, max_length=128, seeds=1, orders=["curriculum"]),
                   trainer=TrainerConfig(progress_bar=False))
    results = run.run()
    root = tmp_path / "tangent"
    import yaml

    for task in TASKS:
        assert yaml.safe_load((root / "experts" / task / "expert" / "expert.yaml").read_text())["kind"] == "tangent"
    assert yaml.safe_load((root / "merge" / "merged" / "expert.yaml").read_text())["kind"] == "tangent"
    assert yaml.safe_load((root / "merge" / "best_genome.yaml").read_text())["kind"] == "tangent"
    models = results["models"]
    assert set(models["evolved_global+icl"]) == set(TASKS)
    # the experts moved the scores: the uniform merge and the experts do not all equal the base model
    assert any(models[m][t]["acc"] != models["base"][t]["acc"] for m in ("uniform", "expert") for t in TASKS)
    assert "Tangent experts" in (root / "report" / "report.md").read_text()
    # whole-set batches: one step per epoch; a model trained past its last validation is validated once more
    phases = json.loads((root / "phases.json").read_text())["phases"]
    assert phases["multitask:multitask"]["steps"] == 3 * 24 // 8  # one epoch of every task, multitask.batch_size 8
    for task in TASKS:
        metrics = json.loads((root / "experts" / task / "metrics.json").read_text())
        assert metrics["epochs"] == 3 and 0 <= metrics["acc"] <= 1


def test_expert_settings_take_the_kinds_own_defaults():
    from memmcl.experts.kinds import KINDS
    from memmcl.settings import resolve_expert

    tangent, lora = resolve_expert(ExpertConfig(kind="tangent")), resolve_expert(ExpertConfig())
    assert (tangent.lr, tangent.lora_r, tangent.off_task_weight) == (0.05, 16, 1.0)
    assert (lora.lr, lora.lora_r, lora.lora_dropout) == tuple(KINDS["lora"].default(f) for f in ("lr", "lora_r", "lora_dropout"))
    assert resolve_expert(ExpertConfig(kind="tangent", lr=0.1)).lr == 0.1  # a set value wins
    with pytest.raises(PipelineError, match=r"^expert.kind: 'nope' is not an expert kind; expected one of \['lora', 'tangent'\]"):
        resolve_expert(ExpertConfig(kind="nope"))

import copy

import pytest
import torch

from memmcl.datamodule import MultiTaskDataModule, TaskDataModule
from memmcl.encoding import IGNORE_INDEX
from memmcl.samplers import TaskMixtureSampler
from memmcl.tasks.extraction import render
from memmcl.tasks.prompts import Demonstration, build_prompt
from memmcl.tasks.readers import read_task, stratified_sample
from memmcl.tasks.spec import Example, embedded_task_names, load_task_spec


@pytest.fixture(scope="module")
def suite(tiny_dir):
    dm = MultiTaskDataModule(embedded_task_names(), backbone=str(tiny_dir), max_length=128, batch_size=8)
    dm.setup()
    return dm


def test_every_embedded_task_masks_all_but_the_answer(suite):
    tok = suite.tokenizer
    for t, name in enumerate(suite.task_names):
        spec = suite.specs[t]
        items = [it for it in suite.items["train"] if it["task"] == t][:4]
        batch = suite._loader(items, 4, None).collate_fn(items)
        for i, item in enumerate(items):
            kept = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
            if spec.kind == "extraction":  # the target text, then the end token that stops generation
                example = next(e for e in suite.examples[name]["train"] if e.id == item["id"])
                assert kept[-1] == tok.eos_token_id and tok.decode(kept[:-1]).strip() == render(example.tuples), name
            else:
                assert tok.decode(kept).strip() == spec.answers[item["label"]], name
            assert batch["input_ids"][i][-len(kept):].tolist() == kept.tolist()  # left padding: the answer ends the row
        assert (batch["attention_mask"].sum(-1) == torch.tensor([len(it["prompt"]) + len(it["answers"][it["label"]]) for it in items])).all()


def test_metadata_differs_as_the_suite_intends(suite):
    md = suite.metadata
    assert md["sc_5class"].n_classes > md["sc_3class"].n_classes > md["sc_binary"].n_classes
    assert md["sc_5class"].label_entropy > md["sc_3class"].label_entropy > md["sc_binary"].label_entropy
    assert md["hate"].imbalance > md["sc_3class"].imbalance  # hate speech is the rare class
    assert md["absa_restaurant"].input_tokens_mean > md["emotion"].input_tokens_mean  # several aspects per sentence
    assert md["absa_restaurant"].type_token_ratio > md["comparative"].type_token_ratio
    assert md["aste_synthetic"].answer_values_mean == pytest.approx(1.5 * md["uabsa_synthetic"].answer_values_mean)
    assert 0 < md["uabsa_synthetic"].empty_share < 0.5 and md["sc_binary"].answer_values_mean == 1
    for m in md.values():
        assert m.split_sizes == {"train": 300, "validation": 100, "test": 100}
        assert 0 < m.label_entropy_norm <= 1 and m.input_tokens_p95 >= m.input_tokens_mean


def test_long_inputs_are_cut_never_instruction_or_answers(tiny):
    _, tok = tiny
    spec = load_task_spec("absa_restaurant")
    long = Example("x", "The food was great and the wine was fine. " * 40, 2, "food")
    demos = [Demonstration("The staff was rude. " * 30, "negative", "staff")]
    ids = build_prompt(tok, spec, long, max_length=96, demos=demos)
    longest_answer = max(len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in spec.answers)
    assert len(ids) + longest_answer <= 96
    text = tok.decode(ids)
    assert spec.instruction in text and "Answer: negative" in text and "Aspect: food" in text and text.endswith("Answer:")


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny):
    _, tok = tiny
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}<s>assistant:"
    spec = load_task_spec("sc_binary")
    text = tok.decode(build_prompt(tok, spec, Example("x", "Great film.", 1), max_length=128))
    assert text.startswith("<s>user: " + spec.instruction) and text.endswith("<s>assistant:")


def test_mixture_sampler_weights_determinism_and_shards():
    sampler = TaskMixtureSampler([10, 20, 30], seed=3)
    full = sampler.global_order()
    assert sorted(full) == list(range(60))  # weight 1 everywhere: one pass over every example
    sampler.set_weights([1, 0, 1])
    order = sampler.global_order()
    assert len(order) == 60 and not any(10 <= i < 30 for i in order)
    assert order == sampler.global_order()
    sampler.set_epoch(1)
    assert order != sampler.global_order()
    shards = [list(TaskMixtureSampler([10, 20, 30], num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(60))
    with pytest.raises(ValueError, match="not all zero"):
        sampler.set_weights([0, 0, 0])


def test_set_task_weights_rejects_unknown_tasks(tiny_dir):
    dm = MultiTaskDataModule(["sc_binary", "irony"], backbone=str(tiny_dir))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        dm.set_task_weights({"nope": 1.0})


def test_single_task_datamodule(tiny_dir):
    dm = TaskDataModule("stance", backbone=str(tiny_dir), max_train_examples=50, eval_batch_size=7)
    dm.setup()
    assert dm.spec.aspect_name == "Target" and len(dm.items["train"]) == 50
    batches = list(dm.val_dataloader())
    assert sum(len(b["id"]) for b in batches) == 100
    capped = TaskDataModule("stance", backbone=str(tiny_dir), max_eval_examples=30, eval_batch_size=7)
    capped.setup()
    assert len(capped.items["train"]) == 300
    full = read_task(capped.spec)[0]["test"]
    served = [b for batch in capped.test_dataloader() for b in batch["id"]]
    assert sorted(served) == sorted(e.id for e in stratified_sample(full, 30, seed=0)) and len(set(served)) == 30
    lengths = [len(it["prompt"]) for it in capped.items["test"]]
    assert lengths == sorted(lengths)  # evaluation batches group similar lengths


def test_evaluation_batches_never_span_two_tasks(tiny_dir):
    dm = MultiTaskDataModule(["sc_binary", "irony", "stance"], backbone=str(tiny_dir), max_eval_examples=10,
                             eval_batch_size=4)
    dm.setup()
    batches = list(dm.val_dataloader())
    assert [len(b["id"]) for b in batches] == [4, 4, 2] * 3  # 10 per task: without the rule, 4 4 4 4 4 4 4 2
    assert all(len(set(b["task"].tolist())) == 1 for b in batches)
    shards = [[i for b in MultiTaskDataModule.val_dataloader(dm_rank) for i in b["id"]]
              for dm_rank in _ranks(dm, 2)]
    assert sorted(shards[0] + shards[1]) == sorted(it["id"] for it in dm.items["validation"])  # each once, over ranks
    assert not set(shards[0]) & set(shards[1])


def _ranks(dm, world: int) -> list:
    """The datamodule as each of `world` ranks sees it."""
    out = []
    for rank in range(world):
        view = copy.copy(dm)
        view._world = lambda rank=rank: (world, rank)
        out.append(view)
    return out

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memmcl.datamodule import TaskDataModule
from memmcl.experts.expert import LoRAExpert, load_expert
from memmcl.experts.expert_io import ExpertError
from memmcl.experts.packing import pack
from memmcl.experts.scoring import MIN_SHARED_PREFIX, answer_loss, score_labels, shared_prefix_length, shares_prefix
from memmcl.tasks.spec import load_task_spec

ROOT = Path(__file__).resolve().parents[1]


def brute_force_scores(model, prompts, answers):
    """Unbatched, unpadded, full-sequence logits: the reference the batched scorer must match."""
    out = torch.full((len(prompts), max(map(len, answers))), float("-inf"))
    with torch.no_grad():
        for i, (prompt, labels) in enumerate(zip(prompts, answers, strict=True)):
            for l, ans in enumerate(labels):
                ids = torch.tensor([prompt + ans])
                logp = F.log_softmax(model(ids).logits[0].float(), -1)
                out[i, l] = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(ans))
    return out


@pytest.fixture(scope="module")
def expert(tiny_dir):
    torch.manual_seed(0)
    e = LoRAExpert(backbone=str(tiny_dir), lora_r=4)
    for name, p in e.model.named_parameters():  # peft's B = 0 init would make the adapter a no-op
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return e.eval()


@pytest.fixture(scope="module")
def data(tiny_dir):
    dm = TaskDataModule("sc_5class", backbone=str(tiny_dir), max_length=128, eval_batch_size=16)
    dm.setup()
    return dm


def test_answer_loss_counts_only_answer_tokens(expert, data):
    batch = next(iter(data.val_dataloader()))
    loss = answer_loss(expert.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref = []
    with torch.no_grad():
        for prompt, answers, label in zip(batch["prompt"], batch["answers"], batch["label"], strict=True):
            ans = answers[label]
            logits = expert.model(torch.tensor([prompt + ans])).logits[0]
            ref.extend(F.cross_entropy(logits[len(prompt) - 1 + j][None], torch.tensor([t])) for j, t in enumerate(ans))
    assert loss.item() == pytest.approx(torch.stack(ref).mean().item(), abs=1e-4)


@pytest.mark.parametrize("multi_token", [False, True])
def test_scores_match_brute_force_at_any_batch_size(expert, data, multi_token):
    items = data.items["validation"][:16]
    prompts = [it["prompt"] for it in items]
    answers = [it["answers"] for it in items]
    if multi_token:  # different lengths per label exercise the (example, label) path
        answers = [[a + a[:1] * l for l, a in enumerate(ans)] for ans in answers]
    pad = data.tokenizer.pad_token_id
    one = torch.cat([score_labels(expert.model, [p], [a], pad) for p, a in zip(prompts, answers, strict=True)])
    sixteen = score_labels(expert.model, prompts, answers, pad, chunk_size=16 if not multi_token else 23)
    # the batch shares its instruction, so the scorer takes the shared-prefix path; one prompt alone does not
    assert shared_prefix_length(prompts) >= MIN_SHARED_PREFIX
    unshared = score_labels(expert.model, prompts, answers, pad, share_prefix=False)
    torch.testing.assert_close(unshared, sixteen, atol=1e-4, rtol=1e-4)
    in_row = score_labels(expert.model, prompts, answers, pad, chunk_size=16, reuse_prefix=False)  # prefix in the row
    torch.testing.assert_close(in_row, sixteen, atol=1e-4, rtol=1e-4)
    assert torch.equal(one.argmax(-1), sixteen.argmax(-1))
    torch.testing.assert_close(one, sixteen, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sixteen, brute_force_scores(expert.model, prompts, answers), atol=1e-4, rtol=1e-4)


def test_packed_scores_without_a_shared_prefix_match_brute_force(expert, data):
    """Prompts with no common prefix still run packed (no padding): each attends only to itself."""
    items = data.items["validation"][:12]
    prompts = [it["prompt"][i % 3 :] for i, it in enumerate(items)]  # three different first tokens
    answers = [[a + a[:1] * (l % 2) for l, a in enumerate(it["answers"])] for it in items]
    assert shared_prefix_length(prompts) == 0 and shares_prefix(expert.model)
    packed = score_labels(expert.model, prompts, answers, data.tokenizer.pad_token_id)
    torch.testing.assert_close(packed, brute_force_scores(expert.model, prompts, answers), atol=1e-4, rtol=1e-4)


def test_shared_prefix_loss_and_gradients_equal_whole_sequences(expert, data):
    batch = next(iter(data.val_dataloader()))
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # padding differs between rows
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    params = [p for p in expert.model.parameters() if p.requires_grad]
    grads = []
    for share in (True, False):
        loss = answer_loss(expert.model, *args, share_prefix=share)
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    (shared, g_shared), (whole, g_whole) = grads
    inputs, packing = pack([[5, 6], [7]], 3, prefix=[1, 2, 3])  # the loss ran the prefix first in the packed row
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 5, 6, 7]] and inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]
    assert packing.in_row_prefix == 3 and packing.groups[0][0].tolist() == [[0, 1, 2]]
    assert packing.groups[1][1].tolist() == [[3, 4], [5, -1]] and packing.order.tolist() == list(range(6))
    assert shared.item() == pytest.approx(whole.item(), abs=1e-5)
    for a, b in zip(g_shared, g_whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_kept_prefix_cache_follows_the_model_state(tiny_dir, data):
    """Batches after the first reuse the kept prefix cache; an in-place weight update must invalidate it."""
    torch.manual_seed(1)
    e = LoRAExpert(backbone=str(tiny_dir), lora_r=4).eval()
    items = data.items["validation"][:24]
    prompts, answers = [it["prompt"] for it in items], [it["answers"] for it in items]
    pad = data.tokenizer.pad_token_id
    before = score_labels(e.model, prompts, answers, pad, chunk_size=8)  # 3 batches, one kept prefix
    torch.testing.assert_close(before, score_labels(e.model, prompts, answers, pad, share_prefix=False), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for name, p in e.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)  # in place, as an optimizer step or a folded genome writes
    after = score_labels(e.model, prompts, answers, pad, chunk_size=8)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, brute_force_scores(e.model, prompts, answers), atol=1e-4, rtol=1e-4)


def test_shared_prefix_length_leaves_room():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # one token of each stays to be scored
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 4]], keep=3) == 1
    assert shared_prefix_length([[1, 2, 3]]) == 0


def test_saved_expert_reproduces_predictions(expert, data, tmp_path, tiny_dir):
    expert.specs = data.specs
    expert.save_expert(tmp_path / "expert")
    again, specs = load_expert(tmp_path / "expert")
    assert specs[0].labels == data.spec.labels and specs[0].answers == data.spec.answers
    batch = next(iter(data.val_dataloader()))
    torch.testing.assert_close(expert.predict_scores(batch), again.predict_scores(batch), atol=1e-5, rtol=1e-5)
    assert not torch.equal(expert.predict_scores(batch), LoRAExpert(backbone=str(tiny_dir)).eval().predict_scores(batch))
    with pytest.raises(ExpertError, match="missing expert.yaml"):
        (tmp_path / "expert" / "expert.yaml").unlink()
        load_expert(tmp_path / "expert")


def _validate(tmp_path, name, adapter, extra):
    cmd = [sys.executable, "-m", "memmcl", "validate", "--config", str(ROOT / "configs/demo/expert.yaml"),
           f"--model.init_args.adapter={adapter}", "--data.init_args.eval_batch_size=7", "--trainer.enable_progress_bar=false",
           "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
           f"--trainer.logger.init_args.name={name}", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    rows = list(csv.DictReader(open(next((tmp_path / name).rglob("metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


def test_ddp_reports_the_same_metrics_as_one_process(expert, data, tmp_path, tiny_dir):
    expert.specs = [load_task_spec("sc_binary")]
    expert.save_expert(tmp_path / "adapter")
    single = _validate(tmp_path, "one", tmp_path / "adapter", [])
    ddp = _validate(tmp_path, "ddp", tmp_path / "adapter", ["--trainer.strategy=ddp", "--trainer.devices=2"])
    assert set(single) == {"val/acc", "val/metric", "val/sc_binary/acc", "val/sc_binary/f1", "val/sc_binary/metric"}
    assert single == pytest.approx(ddp, abs=1e-6)


def test_saving_over_an_expert_replaces_it_and_a_failed_save_keeps_the_old(expert, data, tmp_path, monkeypatch):
    expert.specs = data.specs
    out = tmp_path / "expert"
    expert.save_expert(out)
    (out / "stale.txt").write_text("from an older save")
    expert.save_expert(out)
    assert not (out / "stale.txt").exists() and (out / "adapter_config.json").exists()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(expert.model, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        expert.save_expert(out)
    assert (out / "adapter_config.json").exists() and (out / "expert.yaml").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["expert"]  # no temporary directory left behind

"""Precision: auto resolves to bf16-mixed where the CPU has native bf16 and to float32 elsewhere; a bf16 run trains
float32 LoRA weights on a bfloat16 backbone, scores merges unfolded and records what ran."""

import json

import pytest
import torch

import memmcl.precision as precision
from memmcl.pipeline import DemoConfig, ExpertConfig, MergeConfig, Pipeline, PipelineError, TrainerConfig
from memmcl.precision import cpu_bf16_flags, resolve_precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert cpu_bf16_flags(info) == ["avx512_bf16"]
    info.write_text("flags\t\t: fpu sse amx_bf16 amx_tile avx512_bf16\n")
    assert cpu_bf16_flags(info) == ["amx_bf16", "avx512_bf16"]
    info.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_bf16_flags(info) == []
    assert cpu_bf16_flags(tmp_path / "missing") == []


@pytest.mark.parametrize(("requested", "accelerator", "flags", "tangent", "trainer", "dtype"), [
    (None, "cpu", ["amx_bf16"], False, "bf16-mixed", "bfloat16"),
    (None, "cpu", [], False, None, "float32"),  # a CPU without native bf16: the float32 path
    (None, "cpu", ["avx512_bf16"], True, None, "float32"),  # tangent experts
    (None, "gpu", ["avx512_bf16"], False, None, "float32"),
    ("bf16", "cpu", [], False, "bf16-mixed", "bfloat16"),  # asked for: bf16 even without native support
    ("bf16-true", "gpu", [], False, "bf16-true", "bfloat16"),
    ("32-true", "cpu", ["amx_bf16"], False, "32-true", "float32"),
    ("32", "cpu", ["amx_bf16"], False, "32-true", "float32"),
])
def test_resolution(requested, accelerator, flags, tangent, trainer, dtype):
    p = resolve_precision(requested, accelerator, float32_only="tangent" if tangent else None, flags=flags)
    assert (p.trainer, p.dtype) == (trainer, dtype)
    assert p.is_float32 == (dtype == "float32" and trainer in (None, "32-true"))


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match=r"^trainer.precision: expected null \(auto\) or one of .*got 'fp8'"):
        resolve_precision("fp8")


def _pipeline(tmp_path, tiny_dir, **trainer):
    return Pipeline(name="p", root=str(tmp_path), backbone=str(tiny_dir), tasks=["sc_binary", "irony"], max_length=64,
                    expert=ExpertConfig(lora_r=2, lora_alpha=4, max_epochs=1, batch_size=8, max_train_examples=16),
                    merge=MergeConfig(population=2, generations=1, max_weak_examples=8, min_weak_examples=4,
                                      task_arithmetic_scales=None),
                    demonstrations=DemoConfig(k=0), max_eval_examples=16,
                    trainer=TrainerConfig(progress_bar=False, **trainer))


def test_auto_follows_the_cpu(tmp_path, tiny_dir, monkeypatch):
    assert _pipeline(tmp_path, tiny_dir).precision.is_float32  # conftest: a CPU without native bf16
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *args: ["avx512_bf16"])
    p = _pipeline(tmp_path, tiny_dir)
    assert (p.precision.trainer, p.dtype) == ("bf16-mixed", "bfloat16")
    assert p.numerics != _pipeline(tmp_path, tiny_dir, precision="32-true").numerics  # separate phase keys
    with pytest.raises(PipelineError, match="^trainer.precision: expected null or 32-true with expert.kind: tangent"):
        Pipeline(name="p", root=str(tmp_path), backbone=str(tiny_dir), tasks=["sc_binary"],
                 expert=ExpertConfig(kind="tangent"), trainer=TrainerConfig(precision="bf16-mixed"))
    with pytest.raises(PipelineError, match="^trainer.precision: expected null"):
        _pipeline(tmp_path, tiny_dir, precision="half")


def test_bf16_pipeline_end_to_end(tmp_path, tiny_dir):
    p = _pipeline(tmp_path, tiny_dir, precision="bf16-mixed")
    results = p.run()
    run = tmp_path / "p"
    recorded = json.loads((run / "phases.json").read_text())["precision"]
    assert recorded["trainer"] == "bf16-mixed" and recorded["dtype"] == "bfloat16"
    assert results["precision"] == recorded
    assert "Precision: bf16-mixed, backbone weights bfloat16" in (run / "report" / "report.md").read_text()
    from safetensors.torch import load_file

    adapter = load_file(run / "experts" / "sc_binary" / "expert" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # LoRA master weights stay float32
    search = p.search()
    assert next(search.model.model.parameters()).dtype == torch.bfloat16 and not search.fold_exact
    assert not search.model.folded  # bf16 merges are scored unfolded
    for model in ("base", "expert", "uniform", "evolved_global"):
        assert set(results["models"][model]) == {"sc_binary", "irony"}


@pytest.mark.parametrize("trainer_precision, dtype, casts", [("bf16-mixed", "bfloat16", False), ("32-true", "float32", True)])
def test_lora_inputs_are_cast_only_outside_autocast(tmp_path, tiny_dir, trainer_precision, dtype, casts):
    """Under bf16-mixed a LoRA layer's input stays bfloat16 (autocast casts each matmul's operands): the same outputs
    as peft's cast to the float32 LoRA weights, without the copy; in float32 nothing changes."""
    import lightning as L
    from peft.tuners.tuners_utils import BaseTunerLayer

    from memmcl.datamodule import MultiTaskDataModule
    from memmcl.experts.expert import LoRAExpert
    from memmcl.experts.lora_speed import set_input_casting

    dm = MultiTaskDataModule(["sc_binary"], backbone=str(tiny_dir), max_length=64, batch_size=4, max_train_examples=8,
                             max_eval_examples=8)
    expert = LoRAExpert(backbone=str(tiny_dir), dtype=dtype, lora_r=2, lora_alpha=4, export_dir=str(tmp_path / "e"))
    layers = [m for m in expert.model.modules() if isinstance(m, BaseTunerLayer)]
    seen = set()

    class Watch(L.Callback):
        def on_train_batch_start(self, *args):
            seen.update(m.cast_input_dtype_enabled for m in layers)

    L.Trainer(max_steps=2, precision=trainer_precision, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              limit_val_batches=0, callbacks=[Watch()]).fit(expert, dm)
    assert layers and seen == {casts}  # during training
    assert {m.cast_input_dtype_enabled for m in layers} == {True}  # after it, outside autocast, peft casts again
    assert {p.dtype for p in expert.model.parameters() if p.requires_grad} == {torch.float32}
    expert.eval()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=not casts):
        set_input_casting(expert.model, casts)
        own = expert.model(input_ids=ids).logits
        set_input_casting(expert.model, True)
        cast = expert.model(input_ids=ids).logits
    assert torch.equal(own, cast)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adamw_is_fused_unless_gradients_are_clipped(tmp_path, tiny_dir, clip):
    """The expert's AdamW runs torch's fused kernel; with gradient clipping it is the plain one, because Lightning's
    mixed precision refuses to clip a fused optimizer's gradients: bf16-mixed training with clipping still runs."""
    import lightning as L

    from memmcl.datamodule import MultiTaskDataModule
    from memmcl.experts.expert import LoRAExpert

    dm = MultiTaskDataModule(["sc_binary"], backbone=str(tiny_dir), max_length=64, batch_size=4, max_train_examples=8,
                             max_eval_examples=8)
    expert = LoRAExpert(backbone=str(tiny_dir), dtype="bfloat16", lora_r=2, lora_alpha=4, export_dir=str(tmp_path / "e"))
    before = {n: p.detach().clone() for n, p in expert.named_parameters() if p.requires_grad}
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=clip, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(expert, dm)
    assert trainer.optimizers[0].defaults["fused"] is (None if clip else True)
    assert any(not torch.equal(p, before[n]) for n, p in expert.named_parameters() if p.requires_grad)


def test_bf16_logits_have_their_top_candidates_exact(tiny_dir):
    """bf16 rounds a logit of 8-16 to a step of 1/16: the best two tokens of a position can tie or swap. Within
    `exact_top_logits`, the top candidates are float32 products of the same bf16 hidden state and weights, so the
    argmax is float32 arithmetic's; a float32 model's logits do not change, and the hook is gone afterwards."""
    from memmcl.experts.backbone import load_backbone
    from memmcl.experts.exact_logits import EXACT_CANDIDATES, exact_top_logits

    ids = torch.randint(0, 1780, (8, 32), generator=torch.Generator().manual_seed(0))
    for dtype in ("bfloat16", "float32"):
        model, _ = load_backbone(str(tiny_dir), dtype)
        model.eval()
        head, seen = model.get_output_embeddings(), {}
        capture = head.register_forward_hook(lambda m, args, out, seen=seen: seen.update(hidden=args[0], plain=out))
        with torch.no_grad():
            with exact_top_logits(model):
                logits = model(ids).logits
            after = model(ids).logits
        capture.remove()
        exact = seen["hidden"].float() @ head.weight.detach().float().T
        if dtype == "float32":
            assert torch.equal(logits, seen["plain"]) and torch.equal(logits, after)
            continue
        assert logits.dtype == torch.float32 and after.dtype == torch.bfloat16
        top = seen["plain"].topk(EXACT_CANDIDATES, dim=-1).indices
        torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-5)
        rest = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, top, False)
        assert torch.equal(logits[rest], seen["plain"].float()[rest])
        assert (seen["plain"].argmax(-1) != exact.argmax(-1)).any()  # the rounding this is for happens here
        assert torch.equal(logits.argmax(-1), exact.argmax(-1))

"""`LoRAExpert`: a frozen causal LM plus a peft LoRA adapter, instruction-tuned on answer tokens only; evaluated by
`LabelScoringModule` (`memmcl.experts.label_scoring`), saved and checked by `memmcl.experts.expert_io`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only

from memmcl.experts.backbone import Dtype, load_backbone
from memmcl.experts.expert_io import EXPERT_FILE, ExpertError, check_expert_dir
from memmcl.experts.label_scoring import LabelScoringModule, gather_records  # noqa: F401  (re-exported)
from memmcl.experts.lora_speed import fuse_lora_forward, set_input_casting
from memmcl.experts.scoring import answer_loss
from memmcl.rundir import atomic_save_dir, write_atomic, write_jsonl_atomic  # noqa: F401  (re-exported)
from memmcl.tasks.spec import TaskSpec, spec_from_dict

# Re-exported for modules that still import them from here: merging/search.py (EXPERT_FILE, LabelScoringModule,
# check_expert_dir, write_atomic), merging/weak.py (gather_records, write_atomic, write_jsonl_atomic), pipeline.py
# (write_atomic). New code imports them from expert_io, label_scoring and memmcl.rundir.

# All attention and MLP projections of Llama/Qwen/Mistral-style models.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAExpert(LabelScoringModule):
    """A LoRA expert: backbone from the shared loader plus a peft LoRA adapter, trained on answer tokens only.

    Args:
        backbone: registered name (`tiny`), local HF model directory, or hub name already in the local cache.
        dtype: weights' dtype when loading the backbone (use `bfloat16` with `--trainer.precision bf16-true` on GPU).
        adapter: a saved expert directory to start from (its LoRA config overrides r/alpha/dropout/targets).
        lora_r, lora_alpha, lora_dropout, target_modules: the LoRA adapter.
        lr, weight_decay, warmup_steps: AdamW with linear warmup, then `lr_schedule`: cosine decay to 0, or constant.
        gradient_checkpointing: non-reentrant, so it works under DDP.
        export_dir: where `fit` writes the trained expert (peft adapter + task specs); default `<log_dir>/expert`.
    """

    def __init__(
        self,
        backbone: str = "tiny",
        dtype: Dtype = "float32",
        adapter: str | None = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        from peft import LoraConfig, PeftModel, get_peft_model

        base, tokenizer = load_backbone(backbone, dtype)
        self.pad_id = tokenizer.pad_token_id
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapter is not None:
            if (meta := check_expert_dir(adapter)).get("kind") or meta.get("tangent"):
                raise ExpertError(f"{adapter}: an expert of kind {meta.get('kind', 'tangent')!r} (expert.yaml: kind); "
                                  "its model is not this LoRA network")
            self.model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        else:
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                                target_modules=list(target_modules or DEFAULT_TARGETS), task_type="CAUSAL_LM")
            self.model = get_peft_model(base, config)
        fuse_lora_forward(self.model)
        # Lightning checkpoints hold only the adapter; the frozen backbone is reloaded from `backbone`.
        self.strict_loading = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = answer_loss(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def setup(self, stage: str) -> None:
        super().setup(stage)
        set_input_casting(self.model, not str(self.trainer.precision).endswith("-mixed"))

    def teardown(self, stage: str) -> None:
        set_input_casting(self.model, True)  # outside the trainer's autocast the model casts its LoRA inputs again
        super().teardown(stage)

    @classmethod
    def from_settings(cls, e, backbone: str, dtype: str, seed: int, export_dir: str) -> LoRAExpert:
        """A fresh expert from the pipeline's `expert` settings (`memmcl.settings.ExpertConfig`, resolved)."""
        return cls(backbone=backbone, dtype=dtype, lora_r=e.lora_r, lora_alpha=e.lora_alpha, lora_dropout=e.lora_dropout,
                   target_modules=e.target_modules, lr=e.lr, weight_decay=e.weight_decay, warmup_steps=e.warmup_steps,
                   lr_schedule=e.lr_schedule, gradient_checkpointing=e.gradient_checkpointing, export_dir=export_dir)

    def configure_optimizers(self) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel a parameter instead of ~10 ops (SmolLM2's 420 LoRA factors: 9.3 -> 2.2 ms a step on 2 CPU
        # threads). torch has it for CPU and CUDA tensors; Lightning's mixed precision refuses to clip its gradients.
        fused = (not self.trainer.gradient_clip_val and all(p.device.type in ("cpu", "cuda") for p in params)) or None
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total // 2)

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.hparams.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k.removeprefix(prefix) in trainable)

    def on_fit_end(self) -> None:
        out = self.hparams.export_dir or os.path.join(self.trainer.log_dir or ".", "expert")
        self.save_expert(out)

    @rank_zero_only
    def save_expert(self, out_dir: str | os.PathLike) -> Path:
        """Writes the peft adapter and the task specs it was trained on into `out_dir` (atomically); returns it."""
        out_dir = Path(out_dir)
        meta = {"backbone": self.hparams.backbone, "tasks": [s.to_dict() for s in self.specs]}

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            (tmp / EXPERT_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))

        atomic_save_dir(out_dir, write, replace=True)
        return out_dir


def load_expert(path: str | os.PathLike, backbone: str | None = None) -> tuple[LoRAExpert, list[TaskSpec]]:
    """Returns a saved expert (on its recorded backbone unless another is given) and the task specs it was trained on."""
    meta = check_expert_dir(path)
    expert = LoRAExpert(backbone=backbone or meta["backbone"], adapter=str(path))
    expert.eval()
    return expert, [spec_from_dict(d, source=f"{path}/{EXPERT_FILE}") for d in meta["tasks"]]

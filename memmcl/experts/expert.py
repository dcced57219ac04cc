"""`LoRAExpert`: a frozen causal LM plus a peft LoRA adapter, instruction-tuned on answer tokens only."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from memmcl.experts.backbone import Dtype, load_backbone
from memmcl.experts.generation import generate_greedy, stop_ids
from memmcl.experts.scoring import answer_loss, score_labels
from memmcl.rundir import atomic_save_dir, write_atomic, write_jsonl_atomic  # noqa: F401  (re-exported)
from memmcl.tasks.extraction import TupleCounts, parse_answer, render
from memmcl.tasks.spec import TaskSpec, spec_from_dict

# All attention and MLP projections of Llama/Qwen/Mistral-style models.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_FILE = "expert.yaml"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SPLIT_NAMES = {"val": "validation", "test": "test"}


class ExpertError(ValueError):
    """A saved expert directory that cannot be loaded; the message names the path and what was expected."""


class LabelScoringModule(L.LightningModule):
    """Validation / test / predict: classification tasks by label scoring, with per-task accuracy, macro-F1 and the
    task's standard metric (torchmetrics, DDP-correct); extraction tasks by greedy generation parsed to tuples, with
    exact-match micro precision / recall / F1 (`memmcl.tasks.extraction`).

    Subclasses provide `self.model` (a causal LM) and `self.pad_id`; the task specs come from the datamodule.
    After each evaluation epoch, `self.results[split][task]` holds that task's {"acc", "f1", "metric"} (extraction:
    "acc" is the share of exact tuple sets, "f1" = "metric" the micro-F1, plus precision, recall and the count of
    malformed answers), and after a test epoch
    `self.correct["test"][task]` each example's {id: prediction correct}, in id order (so two models' vectors over the
    same examples align); both equal on every rank. Validation keeps no per-example record: it is the merge search's
    fitness, run once per genome, and nothing reads it.
    """

    log_eval_to_logger = True
    generates = True  # can evaluate extraction tasks (greedy generation in `self.model`); tangent models cannot
    results: dict[str, dict[str, dict[str, float]]]
    correct: dict[str, dict[str, dict[str, bool]]]

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        specs: list[TaskSpec] = datamodule.specs
        if not hasattr(self, "results"):
            self.results, self.correct, self._outcomes = {}, {}, []
        if getattr(self, "specs", None) == specs:
            return
        if not self.generates and (extraction := [s.name for s in specs if s.extraction]):
            raise ExpertError(f"{type(self).__name__}: tangent experts score labels; extraction task(s) {extraction} are "
                              "generated; expected classification tasks (or ordinary LoRA experts)")
        self.specs = specs
        self.metrics = torch.nn.ModuleDict({
            split: torch.nn.ModuleList([
                MetricCollection({
                    "acc": MulticlassAccuracy(s.n_classes, average="micro"),
                    "f1": MulticlassF1Score(s.n_classes, average="macro"),
                    "class_f1": MulticlassF1Score(s.n_classes, average="none"),
                })
                for s in specs
            ])
            for split in ("val", "test")
        })
        self.tuple_counts = {split: [TupleCounts() for _ in specs] for split in ("val", "test")}

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Moves the batch's tensors; its token-id lists stay as they are (Lightning's default walks every int)."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def predict_scores(self, batch: dict) -> torch.Tensor:
        """Returns [B, max labels] answer log-likelihoods for a batch (the shared label scorer)."""
        return score_labels(self.model, batch["prompt"], batch["answers"], self.pad_id).to(self.device)

    def generate_tuples(self, batch: dict) -> list[tuple | None]:
        """Returns each row's generated answer parsed to tuples (None: malformed), rows of extraction tasks only."""
        tokenizer = self.trainer.datamodule.tokenizer
        tokens = generate_greedy(self.model, batch["prompt"], self.pad_id, stop_ids(tokenizer), batch["max_new"])
        return [parse_answer(self.specs[int(t)], tokenizer.decode(ids, skip_special_tokens=True))
                for t, ids in zip(batch["task"].tolist(), tokens, strict=True)]

    def _eval_step(self, batch: dict, split: str) -> None:
        kinds = [self.specs[t].extraction for t in batch["task"].tolist()]
        hits: list[bool] = [False] * len(kinds)
        if any(kinds):
            rows = [i for i, k in enumerate(kinds) if k]
            sub = select_rows(batch, rows)
            for i, t, predicted, gold in zip(rows, sub["task"].tolist(), self.generate_tuples(sub), sub["tuples"], strict=True):
                hits[i] = self.tuple_counts[split][t].add(predicted, gold)
        if not all(kinds):
            rows = [i for i, k in enumerate(kinds) if not k]
            sub = select_rows(batch, rows) if len(rows) < len(kinds) else batch
            preds = self.predict_scores(sub).argmax(-1)
            for t in sub["task"].unique().tolist():
                mask = sub["task"] == t
                self.metrics[split][t].update(preds[mask], sub["label"][mask])
            for i, hit in zip(rows, (preds == sub["label"].to(preds.device)).tolist(), strict=True):
                hits[i] = hit
        if split == "test":
            self._outcomes.extend(zip(batch["task"].tolist(), batch["id"], hits, strict=True))

    def _eval_epoch_end(self, split: str) -> None:
        """Computes per-task accuracy / macro-F1 (synced across ranks), keeps them in `self.results[split]`, logs them;
        after a test epoch keeps every rank's per-example correctness in `self.correct["test"]`."""
        counts = self.tuple_counts[split]
        if any(s.extraction for s in self.specs):  # every rank's counts, summed (one collective; none without any)
            counts = [sum(c, TupleCounts()) for c in zip(*gather_records([counts]), strict=True)]
        self.tuple_counts[split] = [TupleCounts() for _ in self.specs]
        if self.trainer.sanity_checking:  # a partial pass: nothing to report
            for metric in self.metrics[split]:
                metric.reset()
            return
        if split == "test":
            correct: dict[str, dict[str, bool]] = {}
            for t, example_id, hit in sorted(gather_records(self._outcomes)):
                correct.setdefault(self.specs[t].name, {})[example_id] = hit
            self.correct["test"], self._outcomes = correct, []
        present = {int(item["task"]) for item in self.trainer.datamodule.items.get(SPLIT_NAMES[split], [])}
        results = {}
        for t, (spec, metric) in enumerate(zip(self.specs, self.metrics[split], strict=True)):
            if t not in present:  # decided from the whole split, so every rank computes (and syncs) the same tasks
                continue
            if spec.extraction:
                results[spec.name] = counts[t].scores()
            else:
                values = metric.compute()
                metric.reset()
                results[spec.name] = {"acc": float(values["acc"]), "f1": float(values["f1"])}
                results[spec.name]["metric"] = spec.metric_value(results[spec.name]["acc"], results[spec.name]["f1"],
                                                                 values["class_f1"].tolist())
            # Already synced by torchmetrics, so equal on every rank: logged everywhere, callbacks (EarlyStopping,
            # ModelCheckpoint) see the same value on each rank.
            self.log(f"{split}/{spec.name}/acc", results[spec.name]["acc"], logger=self.log_eval_to_logger)
            self.log(f"{split}/{spec.name}/f1", results[spec.name]["f1"], logger=self.log_eval_to_logger)
            self.log(f"{split}/{spec.name}/metric", results[spec.name]["metric"], logger=self.log_eval_to_logger)
        if results:
            mean = sum(r["acc"] for r in results.values()) / len(results)
            self.log(f"{split}/acc", mean, prog_bar=True, logger=self.log_eval_to_logger)
            metric = sum(r["metric"] for r in results.values()) / len(results)
            self.log(f"{split}/metric", metric, logger=self.log_eval_to_logger)
        self.results[split] = results

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Returns a record per example: its gold and predicted label with every label's score; for extraction tasks
        the gold and predicted answer texts (malformed: null), the predicted tuples, and the gold answer's
        log-likelihood as its one score ("gold")."""
        kinds = [self.specs[t].extraction for t in batch["task"].tolist()]
        if any(kinds):
            if not all(kinds):
                rows = [i for i, k in enumerate(kinds) if not k]
                rest = [i for i, k in enumerate(kinds) if k]
                return self.predict_step(select_rows(batch, rows), batch_idx) + self.predict_step(select_rows(batch, rest), batch_idx)
            gold_scores = score_labels(self.model, batch["prompt"], [[it[0]] for it in batch["answers"]], self.pad_id)
            records = []
            for i, predicted in enumerate(self.generate_tuples(batch)):
                records.append({"task": self.specs[int(batch["task"][i])].name, "id": batch["id"][i], "kind": "extraction",
                                "gold": render(batch["tuples"][i]),
                                "prediction": None if predicted is None else render(predicted),
                                "tuples": None if predicted is None else [list(t) for t in predicted],
                                "scores": {"gold": float(gold_scores[i, 0])}})
            return records
        scores = self.predict_scores(batch)
        records = []
        for i in range(len(batch["id"])):
            spec = self.specs[int(batch["task"][i])]
            row = scores[i, : spec.n_classes]
            records.append({
                "task": spec.name,
                "id": batch["id"][i],
                "gold": spec.labels[int(batch["label"][i])],
                "prediction": spec.labels[int(row.argmax())],
                "scores": {label: float(v) for label, v in zip(spec.labels, row.tolist(), strict=True)},
            })
        return records


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
            if check_expert_dir(adapter).get("tangent"):
                raise ExpertError(f"{adapter}: a tangent expert (expert.yaml: tangent); its model is the tangent model "
                                  "that MergeSearch scores, not this LoRA network")
            self.model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        else:
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                                target_modules=list(target_modules or DEFAULT_TARGETS), task_type="CAUSAL_LM")
            self.model = get_peft_model(base, config)
        # Lightning checkpoints hold only the adapter; the frozen backbone is reloaded from `backbone`.
        self.strict_loading = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = answer_loss(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
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


def write_lora_adapter(out_dir: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
                       base_name_or_path: str = "") -> Path:
    """Writes LoRA factors {module: (A [r, in], B [out, r])} into `out_dir` as a peft adapter whose every module
    applies scaling · B A (ranks may differ per module); `merging.multilora.read_lora_factors` reads it back."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    def alpha(rank: int) -> float:
        value = rank * scaling
        return int(value) if float(value).is_integer() else value

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    r = max(ranks.values())
    config = LoraConfig(r=r, lora_alpha=alpha(r), target_modules=sorted(ranks), lora_dropout=0.0, bias="none",
                        rank_pattern={n: k for n, k in ranks.items() if k != r},
                        alpha_pattern={n: alpha(k) for n, k in ranks.items() if k != r},
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name_or_path)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS))
    return out_dir


def check_expert_dir(path: str | os.PathLike) -> dict:
    """Returns the expert.yaml of a saved expert directory; errors name the path and what was expected."""
    path = Path(path)
    if not path.is_dir():
        raise ExpertError(f"{path}: no such expert directory; expected one written by LoRAExpert.save_expert")
    for name in ("adapter_config.json", EXPERT_FILE):
        if not (path / name).exists():
            raise ExpertError(f"{path}: missing {name}; expected a peft adapter plus {EXPERT_FILE}")
    return yaml.safe_load((path / EXPERT_FILE).read_text())


def load_expert(path: str | os.PathLike, backbone: str | None = None) -> tuple[LoRAExpert, list[TaskSpec]]:
    """Returns a saved expert (on its recorded backbone unless another is given) and the task specs it was trained on."""
    meta = check_expert_dir(path)
    expert = LoRAExpert(backbone=backbone or meta["backbone"], adapter=str(path))
    expert.eval()
    return expert, [spec_from_dict(d, source=f"{path}/{EXPERT_FILE}") for d in meta["tasks"]]


def select_rows(batch: dict, rows: list[int]) -> dict:
    """Returns the batch's rows `rows` (tensors indexed, lists picked)."""
    index = torch.tensor(rows)
    return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in batch.items()}


def gather_records(records: list) -> list:
    """Returns every rank's records, concatenated in rank order (the records themselves outside DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return records
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]

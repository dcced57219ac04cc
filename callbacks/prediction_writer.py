"""`PredictionWriter`: writes `predict` results as JSONL (task, id, gold, prediction, per-label scores)."""

from __future__ import annotations

from lightning.pytorch.callbacks import BasePredictionWriter

from memmcl.experts.label_scoring import gather_records
from memmcl.rundir import write_jsonl_atomic


class PredictionWriter(BasePredictionWriter):
    """Gathers every rank's prediction records and writes them once, sorted by (task, id), to `output` (atomically)."""

    def __init__(self, output: str = "predictions.jsonl"):
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        records = gather_records([r for batch in predictions for r in batch])
        if trainer.is_global_zero:
            write_jsonl_atomic(self.output, sorted(records, key=lambda r: (r["task"], r["id"])))

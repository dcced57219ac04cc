"""`LabelScoringModule`: evaluation of a causal LM on task specs (label scoring, or greedy generation for extraction
tasks), shared by LoRA experts, tangent experts and the merge search; `gather_records` collects every rank's records."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from memmcl.experts.expert_io import ExpertError
from memmcl.experts.generation import generate_greedy, stop_ids
from memmcl.experts.scoring import score_labels
from memmcl.tasks.spec import TaskSpec

SPLIT_NAMES = {"val": "validation", "test": "test"}


class LabelScoringModule(L.LightningModule):
    """Validation / test / predict, in the evaluation mode of each task's kind (`memmcl.tasks.kinds`): tasks of a
    scoring kind (classification) by label scoring, with per-task accuracy, macro-F1 and the task's standard metric
    (torchmetrics, DDP-correct); tasks of a generating kind (extraction) by greedy generation parsed and counted by
    their kind (extraction: tuples, exact-match micro precision / recall / F1, `memmcl.tasks.extraction`).

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
        if not self.generates and (generated := [s for s in specs if s.task_kind.generates]):
            raise ExpertError(f"{type(self).__name__}: tangent experts score labels; {generated[0].kind} task(s) "
                              f"{[s.name for s in generated]} are generated; expected classification tasks (or ordinary "
                              "LoRA experts)")
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
        self.answer_counts = {split: self._new_counts() for split in ("val", "test")}

    def _new_counts(self) -> list:
        """Per task, the counts of its generated answers (its kind's `counts()`; None for a task scored by labels)."""
        return [s.task_kind.counts() if s.task_kind.generates else None for s in self.specs]

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Moves the batch's tensors; its token-id lists stay as they are (Lightning's default walks every int)."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def predict_scores(self, batch: dict) -> torch.Tensor:
        """Returns [B, max labels] answer log-likelihoods for a batch (the shared label scorer)."""
        return score_labels(self.model, batch["prompt"], batch["answers"], self.pad_id).to(self.device)

    def generate_answers(self, batch: dict) -> list:
        """Returns each row's generated answer as its task kind parses it (extraction: tuples; None: malformed), rows
        of generated tasks only."""
        tokenizer = self.trainer.datamodule.tokenizer
        tokens = generate_greedy(self.model, batch["prompt"], self.pad_id, stop_ids(tokenizer), batch["max_new"])
        specs = [self.specs[int(t)] for t in batch["task"].tolist()]
        return [s.task_kind.parse_answer(s, tokenizer.decode(ids, skip_special_tokens=True))
                for s, ids in zip(specs, tokens, strict=True)]

    def _eval_step(self, batch: dict, split: str) -> None:
        kinds = [self.specs[t].task_kind.generates for t in batch["task"].tolist()]
        hits: list[bool] = [False] * len(kinds)
        if any(kinds):
            rows = [i for i, k in enumerate(kinds) if k]
            sub = select_rows(batch, rows)
            for i, t, predicted, gold in zip(rows, sub["task"].tolist(), self.generate_answers(sub), sub["gold"], strict=True):
                hits[i] = self.answer_counts[split][t].add(predicted, gold)
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
        counts = self.answer_counts[split]
        if any(s.task_kind.generates for s in self.specs):  # every rank's counts, summed (one collective; none without)
            counts = [None if c[0] is None else sum(c[1:], c[0]) for c in zip(*gather_records([counts]), strict=True)]
        self.answer_counts[split] = self._new_counts()
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
            if spec.task_kind.generates:
                results[spec.name] = counts[t].scores()
            else:
                values = metric.compute()
                metric.reset()
                results[spec.name] = {"acc": float(values["acc"]), "f1": float(values["f1"])}
                results[spec.name]["metric"] = spec.task_kind.metric_value(
                    spec, results[spec.name]["acc"], results[spec.name]["f1"], values["class_f1"].tolist())
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
        kinds = [self.specs[t].task_kind.generates for t in batch["task"].tolist()]
        if any(kinds):
            if not all(kinds):
                rows = [i for i, k in enumerate(kinds) if not k]
                rest = [i for i, k in enumerate(kinds) if k]
                return self.predict_step(select_rows(batch, rows), batch_idx) + self.predict_step(select_rows(batch, rest), batch_idx)
            gold_scores = score_labels(self.model, batch["prompt"], [[it[0]] for it in batch["answers"]], self.pad_id)
            records = []
            for i, predicted in enumerate(self.generate_answers(batch)):
                spec = self.specs[int(batch["task"][i])]
                render = spec.task_kind.render
                records.append({"task": spec.name, "id": batch["id"][i], "kind": spec.kind,
                                "gold": render(batch["gold"][i]),
                                "prediction": None if predicted is None else render(predicted),
                                **spec.task_kind.prediction_fields(predicted),
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

"""Tasks as LightningDataModules: tokenized splits (`memmcl.encoding`), answer-only labels, difficulty metadata,
demonstrations, a re-weightable sampler (`memmcl.samplers`)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from memmcl.curriculum.demonstrations import DemoOrder, DemoScope, DemoSelect, select_demonstration_sets
from memmcl.curriculum.difficulty import read_difficulty_order
from memmcl.encoding import collate, encode_examples, generation_budget
from memmcl.experts.backbone import load_tokenizer
from memmcl.samplers import EvalShardSampler, TaskMixtureSampler, task_batches
from memmcl.tasks.metadata import TaskMetadata, compute_metadata
from memmcl.tasks.readers import read_task, stratified_sample
from memmcl.tasks.spec import Example, TaskError, TaskSpec, load_task_specs


class MultiTaskDataModule(L.LightningDataModule):
    """Several sentiment tasks, tokenized for one backbone; training samples tasks by re-weightable weights.

    Args:
        tasks: shipped task names (`sc_binary`) or paths to task spec YAML files.
        backbone: the backbone whose tokenizer encodes prompts (a registered name, local directory or hub name).
        max_length: prompt + answer tokens at most; longer inputs are cut, never instructions or answers.
        batch_size: training batch size per device.
        eval_batch_size: validation / test / predict batch size per device.
        max_train_examples: keep N training examples of each task (a seeded sample stratified by label; smoke runs).
        max_eval_examples: keep N validation and test examples of each task, sampled the same way (slow CPU runs).
        data_dir: the data folder of task specs whose split paths start with `data:` (default: $MEMMCL_DATA_DIR,
            else ../shared/realdata where it exists).
        samples_per_epoch: training samples per epoch (default: all training examples once).
        predict_split: the split `predict` runs over.
        seed: sampling seed.
        demonstrations: in-context demonstrations per evaluation prompt (validation / test / predict), drawn from
            training data only (see `memmcl.curriculum.demonstrations`).
        train_demonstrations: demonstration-aware training: a `train_demo_share` of the training prompts (a seeded
            choice per task) carry 1..`train_demonstrations` demonstrations (a seeded count per example) from the
            same task's training split, never the example itself, in `demo_order` (`none` counts as curriculum);
            the other prompts stay zero-shot.
        demo_max_length: prompt + answer tokens of a prompt with demonstrations (default `max_length`).
        demo_seed: the seed of demonstration draws (default `seed`; the ablation varies it alone, so the sampled
            evaluation examples stay the same).
        encode_splits: encode only these splits into prompts (default: all; every split is still read, so the
            training pools and metadata are whole).
        demo_order: `curriculum` (easy → hard), `reverse` (hard → easy), `random` or `none`.
        demo_fixed: one demonstration set per task for every query (the few-shot protocol; prompts share their
            prefix, so scoring is faster) instead of a set drawn per query.
        demo_scope: draw demonstrations from the query's task (`task`) or from every task of its group (`group`).
        demo_select: `balanced` (a seeded draw, labels in turn) or `similar` (the training examples whose words
            overlap the query's most, nearest neighbours); training demonstrations are selected the same way.
        demo_losses: a folder of `<task>.example_loss.json` files ({example id: expert loss}, written by weak-data
            mining) that rank examples by difficulty; without it, shorter inputs count as easier.
        difficulty_file: a `difficulty.json` whose `order` ranks tasks easy → hard (for `demo_scope: group`).
    """

    def __init__(
        self,
        tasks: list[str],
        backbone: str = "tiny",
        max_length: int = 256,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        max_train_examples: int | None = None,
        samples_per_epoch: int | None = None,
        predict_split: str = "test",
        seed: int = 0,
        demonstrations: int = 0,
        demo_order: DemoOrder = "curriculum",
        demo_scope: DemoScope = "task",
        demo_losses: str | None = None,
        difficulty_file: str | None = None,
        max_eval_examples: int | None = None,
        data_dir: str | None = None,
        demo_fixed: bool = False,
        train_demonstrations: int = 0,
        train_demo_share: float = 0.5,
        demo_max_length: int | None = None,
        demo_seed: int | None = None,
        encode_splits: list[str] | None = None,
        demo_select: DemoSelect = "balanced",
    ):
        super().__init__()
        if demo_select == "similar" and demo_fixed:
            raise TaskError("data.demo_select=similar picks demonstrations per query; expected data.demo_fixed=false")
        self.demo_select = demo_select
        if train_demonstrations < 0 or not 0 <= train_demo_share <= 1:
            raise TaskError(f"data.train_demonstrations={train_demonstrations}, data.train_demo_share={train_demo_share}: "
                            "expected a count >= 0 and a share in [0, 1]")
        self.train_demonstrations, self.train_demo_share = train_demonstrations, train_demo_share
        self.demo_max_length, self.demo_seed = demo_max_length, seed if demo_seed is None else demo_seed
        self.encode_splits = encode_splits
        self.max_eval_examples, self.demo_fixed = max_eval_examples, demo_fixed
        if demonstrations < 0:
            raise TaskError(f"data.demonstrations={demonstrations}: expected a count >= 0")
        self.demonstrations, self.demo_order, self.demo_scope = demonstrations, demo_order, demo_scope
        self.demo_losses, self.difficulty_file = demo_losses, difficulty_file
        if not tasks:
            raise TaskError("data.tasks is empty; expected at least one task name or spec path")
        self.backbone, self.max_length, self.seed = backbone, max_length, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_train_examples, self.samples_per_epoch, self.predict_split = max_train_examples, samples_per_epoch, predict_split
        self.specs = load_task_specs(list(tasks), data_dir)
        self.tokenizer = None
        self.examples: dict[str, dict[str, list[Example]]] = {}
        self.items: dict[str, list[dict]] = {}
        self._metadata: dict[str, TaskMetadata] = {}
        self._train_sampler: TaskMixtureSampler | None = None

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def setup(self, stage: str | None = None) -> None:
        if self.items:
            return
        self.tokenizer = load_tokenizer(self.backbone, padding_side="left")
        for spec in self.specs:
            splits, duplicates = read_task(spec)
            caps = {"train": self.max_train_examples, "validation": self.max_eval_examples, "test": self.max_eval_examples}
            for split, cap in caps.items():
                if split in splits:  # a seeded, label-stratified sample: a label-sorted file keeps its label mix
                    splits[split] = stratified_sample(splits[split], cap, self.seed)
            self.examples[spec.name] = splits
            if "train" in splits:  # a validation-only task (weak data) has no training metadata
                self._metadata[spec.name] = compute_metadata(spec, splits, self.tokenizer, duplicates)
        demos_for, train_demos_for = self._demonstration_source(), self._train_demonstration_source()
        for t, spec in enumerate(self.specs):
            splits = self.examples[spec.name]
            # weak data (a validation-only task) is training data: its own targets set the budget
            budget = generation_budget(self.tokenizer, spec, splits.get("train") or next(iter(splits.values()))) \
                if spec.task_kind.generates else 0
            for split, examples in splits.items():
                if self.encode_splits is not None and split not in self.encode_splits:
                    continue
                source = train_demos_for if split == "train" else demos_for
                demos = source(spec.name, examples) if source else None
                items = encode_examples(self.tokenizer, spec, t, examples, self.max_length, demos, self.demo_max_length,
                                        budget)
                if split != "train":
                    # Evaluation batches of similar prompt lengths waste little on padding (metrics and written
                    # predictions do not depend on the order); each task's items stay together, so its batches
                    # share the task's prompt prefix.
                    items.sort(key=lambda it: len(it["prompt"]))
                self.items.setdefault(split, []).extend(items)

    def _demonstration_source(self) -> Callable | None:
        """Returns f(task, examples) -> each example's demonstrations for evaluation prompts, or None without them."""
        if not self.demonstrations or self.demo_order == "none":
            return None
        specs, train, losses, task_order = self._demo_context("data.demonstrations", self.demonstrations)

        def demos_for(task: str, examples: list[Example]) -> list[list]:
            return select_demonstration_sets(examples, task, specs, train, [self.demonstrations] * len(examples),
                                             self.demo_order, self.demo_scope, task_order, losses, self.demo_seed,
                                             self.demo_fixed, self.demo_select)

        return demos_for

    def _train_demonstration_source(self) -> Callable | None:
        """Returns f(task, examples) -> each example's demonstrations for training prompts (a seeded share of each
        task's examples, a seeded count in 1..k each), or None without demonstration-aware training."""
        if not self.train_demonstrations or not self.train_demo_share:
            return None
        specs, train, losses, task_order = self._demo_context("data.train_demonstrations", self.train_demonstrations)
        counts: dict[str, dict[str, int]] = {}
        for name, examples in train.items():
            rng = random.Random(f"{self.demo_seed}:train-demos:{name}")
            ids = sorted(e.id for e in examples)
            rng.shuffle(ids)
            counts[name] = {i: rng.randint(1, self.train_demonstrations)
                            for i in ids[: round(self.train_demo_share * len(ids))]}
        order = "curriculum" if self.demo_order == "none" else self.demo_order

        def demos_for(task: str, examples: list[Example]) -> list[list]:
            ks = [counts[task].get(e.id, 0) for e in examples]
            return select_demonstration_sets(examples, task, specs, train, ks, order, self.demo_scope, task_order,
                                             losses, self.demo_seed, select=self.demo_select)

        return demos_for

    def _demo_context(self, field: str, k: int) -> tuple:
        """Returns (specs, train pools, per-example losses, task order) that demonstrations are drawn and ordered by."""
        specs = {s.name: s for s in self.specs}
        train = {n: splits["train"] for n, splits in self.examples.items() if "train" in splits}
        missing = sorted(set(specs) - set(train))
        if missing:
            raise TaskError(f"{field}={k}: task(s) {missing} have no train split to draw from")
        losses = {}
        if self.demo_losses is not None:
            for name in specs:
                path = Path(self.demo_losses) / f"{name}.example_loss.json"
                if not path.exists():  # silently ranking by length instead would change the prompts
                    raise TaskError(f"data.demo_losses: {path} is missing; expected each task's per-example losses "
                                    f"(written by weak-data mining), or leave demo_losses unset to rank by input length")
                losses[name] = json.loads(path.read_text())
        task_order = read_difficulty_order(self.difficulty_file, "data.difficulty_file") if self.difficulty_file is not None else None
        return specs, train, losses, task_order

    @property
    def metadata(self) -> dict[str, TaskMetadata]:
        """Returns each task's difficulty metadata (after `setup`)."""
        if not self._metadata:
            self.setup()
        return self._metadata

    def sample_prompts(self, split: str, n: int, seed: int) -> dict[str, list[tuple[list[int], list[list[int]]]]]:
        """Returns {task: (prompt ids, label answers' ids) of n of its encoded `split` items} (all when fewer), a
        seeded draw; call after `setup`."""
        pool: dict[str, list] = {s.name: [] for s in self.specs}
        for item in self.items[split]:
            pool[self.specs[item["task"]].name].append((item["prompt"], item["answers"]))
        rng = random.Random(seed)
        return {t: rng.sample(items, min(len(items), n)) for t, items in pool.items()}

    def set_task_weights(self, weights: dict[str, float]) -> None:
        """Sets per-task training sampling weights (by task name; missing tasks get 0) for the next epoch."""
        unknown = set(weights) - set(self.task_names)
        if unknown:
            raise TaskError(f"task weights name unknown task(s) {sorted(unknown)}; tasks are {self.task_names}")
        self._weights = [float(weights.get(n, 0.0)) for n in self.task_names]
        if self._train_sampler is not None:
            self._train_sampler.set_weights(self._weights)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, items: list, batch_size: int | None, sampler) -> DataLoader:
        return DataLoader(items, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sizes = [len(self.examples[n]["train"]) for n in self.task_names]
        self._train_sampler = TaskMixtureSampler(sizes, world, rank, self.seed, self.samples_per_epoch)
        if getattr(self, "_weights", None):
            self._train_sampler.set_weights(self._weights)
        return self._loader(self.items["train"], self.batch_size, self._train_sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        """This rank's share of the examples (every `world`-th: each task on every rank, so every rank runs the same
        evaluation epochs) in batches of one task each (a task's prompts share its instruction: the prefix encoded
        once, and kept for the task's next batch), at most `eval_batch_size` items."""
        if split not in self.items:
            raise TaskError(f"split '{split}' is missing from task(s) {self.task_names}")
        world, rank = self._world()
        items = self.items[split]
        batches = task_batches([items[i] for i in EvalShardSampler(items, world, rank)], self.eval_batch_size)
        # each element a whole batch (batch_size None), sampled by a DistributedSampler so Lightning does not shard again
        return self._loader(batches, None, EvalShardSampler(batches))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)


class TaskDataModule(MultiTaskDataModule):
    """One sentiment task as a LightningDataModule (see `MultiTaskDataModule` for the arguments)."""

    def __init__(
        self,
        task: str,
        backbone: str = "tiny",
        max_length: int = 256,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        max_train_examples: int | None = None,
        predict_split: str = "test",
        seed: int = 0,
        demonstrations: int = 0,
        demo_order: DemoOrder = "curriculum",
        demo_losses: str | None = None,
        max_eval_examples: int | None = None,
        data_dir: str | None = None,
    ):
        super().__init__([task], backbone, max_length, batch_size, eval_batch_size, num_workers, max_train_examples,
                         None, predict_split, seed, demonstrations, demo_order, "task", demo_losses,
                         max_eval_examples=max_eval_examples, data_dir=data_dir)

    @property
    def spec(self) -> TaskSpec:
        return self.specs[0]

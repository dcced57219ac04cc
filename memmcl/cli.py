"""The `memmcl` command: LightningCLI with fit / validate / test / predict, and room for the method's own verbs.

Models and DataModules are given as `class_path` / `init_args` in YAML. A new subcommand is one typed method on
`MemmclTrainer` plus one entry in `EXTRA_SUBCOMMANDS`.
"""

from __future__ import annotations

import logging
import os

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

# subcommand name -> the arguments (besides the trainer's own) that its MemmclTrainer method takes.
EXTRA_SUBCOMMANDS: dict[str, set[str]] = {}


class MemmclTrainer(L.Trainer):
    """The Trainer the CLI builds; the method's own subcommands are typed methods here."""


class MemmclCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_class", MemmclTrainer)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "memmcl", "default_hp_metric": False}},
        })
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **EXTRA_SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        # The model's backbone decides the tokenizer the data is encoded with: name it once.
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone", apply_on="parse")


def main(args: list[str] | None = None) -> None:
    """Entry point of the `memmcl` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    MemmclCLI(args=args)


__all__ = ["MemmclCLI", "MemmclTrainer", "TensorBoardLogger", "main"]

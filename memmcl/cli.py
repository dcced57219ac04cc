"""The `memmcl` command: LightningCLI with fit / validate / test / predict, and room for the method's own verbs.

Models and DataModules are given as `class_path` / `init_args` in YAML. A new subcommand is one typed method on
`MemmclTrainer` plus one entry in `EXTRA_SUBCOMMANDS`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

# subcommand name -> the arguments (besides the trainer's own) that its MemmclTrainer method takes.
EXTRA_SUBCOMMANDS: dict[str, set[str]] = {"merge": {"model", "datamodule"}}


class MemmclTrainer(L.Trainer):
    """The Trainer the CLI builds; the method's own subcommands are typed methods here."""

    def merge(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None, resume: bool = False,
              genome: str | None = None) -> None:
        """Evolutionary merge of LoRA experts (model: `memmcl.merging.search.MergeSearch`).

        Args:
            resume: continue an interrupted search from its saved state (finished stages are reused).
            genome: skip the search and apply a `best_genome.yaml` (then export and evaluate it).
        """
        from memmcl.merging.search import MergeSearch

        if not isinstance(model, MergeSearch):
            raise ValueError(f"memmcl merge needs model.class_path memmcl.merging.search.MergeSearch, got {type(model).__name__}")
        self.merge_result = model.run(self, resume=resume, genome=genome)
        if self.is_global_zero:
            print(format_merge_summary(self.merge_result, model.out_dir))


def format_merge_summary(record: dict, out_dir) -> str:
    """A short text table: fitness per stage and, if evaluated, test accuracy of base / uniform / evolved merges."""
    lines = [f"merge written to {out_dir} (best_genome.yaml, merged/)"]
    for stage, r in record.get("stages", {}).items():
        lines.append(f"  stage {stage:8s} weak-data fitness: uniform {r['uniform_fitness']:.4f} -> evolved {r['fitness']:.4f}")
    for name, r in record.get("test", {}).items():
        groups = "  ".join(f"{k.removeprefix('mean_acc_')} {v:.3f}" for k, v in r.items() if k.startswith("mean_acc_"))
        lines.append(f"  test {name:16s} mean acc {r['mean_acc']:.3f}   {groups}")
    return "\n".join(lines)


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
        super().__init__(L.LightningModule, None, *args, **kwargs)  # None: `data` is optional (merge has none)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **EXTRA_SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        # The model's backbone decides the tokenizer the data is encoded with: name it once.
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone", apply_on="parse")


def build_pipeline(args: list[str]):
    """Returns (parser, parsed config, Pipeline) for `memmcl pipeline` arguments; every setting is checked here,
    before anything runs."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from memmcl.pipeline import Pipeline

    parser = ArgumentParser(prog="memmcl pipeline", description=Pipeline.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a pipeline YAML (configs/demo/pipeline.yaml)")
    parser.add_class_arguments(Pipeline)
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    return parser, cfg, Pipeline(**{k: v for k, v in init.items() if k != "config"})


def save_config(parser, cfg, path: Path) -> None:
    """Writes the resolved configuration with every field, null ones too (`stop_at_accuracy: null` left out would
    come back as its default), so a run started from a run directory's config.yaml is the same run."""
    accepts = inspect.signature(parser.save).parameters
    keep_nulls = {"skip_unset": False} if "skip_unset" in accepts else {"skip_none": False}
    unchecked = {"skip_validation": True} if "skip_validation" in accepts else {"skip_check": True}
    parser.save(cfg, str(path), overwrite=True, **keep_nulls, **unchecked)


def pipeline_main(args: list[str]) -> None:
    """`memmcl pipeline --config configs/demo/pipeline.yaml [--merge.generations 20 ...]`: the whole method."""
    parser, cfg, pipeline = build_pipeline(args)
    from lightning.pytorch.utilities import rank_zero_only

    from memmcl.rundir import inside

    def write_config() -> None:  # only once the settings and the data passed and the run directory is ours
        if rank_zero_only.rank == 0:
            save_config(parser, cfg, inside(pipeline.run_dir, "config.yaml"))

    results = pipeline.run(on_data_checked=write_config)
    if rank_zero_only.rank == 0:
        means = results["means"]
        width = max(len(m) for m in means)
        print("\n".join([f"mean test score (each task's metric) over {len(results['groups'])} tasks:",
                         *(f"  {m:{width}s} {v['overall']:.3f}" for m, v in means.items()),
                         f"report: {pipeline.run_dir / 'report' / 'report.md'}",
                         f"tensorboard --logdir {pipeline.run_dir / 'tensorboard'}"]))


def report_main(args: list[str]) -> None:
    """`memmcl report RUN_DIR`: re-renders RUN_DIR/report/report.md and its plots."""
    from jsonargparse import ArgumentParser

    from memmcl.report import write_report

    parser = ArgumentParser(prog="memmcl report", description="Re-renders report.md and PNG plots of a pipeline run.")
    parser.add_argument("run_dir", type=str, help="a run directory written by memmcl pipeline (runs/<name>)")
    print(write_report(parser.parse_args(args).run_dir))


def data_main(args: list[str]) -> None:
    """`memmcl data fetch | build | check`: the real-task data folder from the pinned public sources."""
    from jsonargparse import ArgumentParser

    from memmcl.data import build as data_build
    from memmcl.data.fetch import fetch

    parser = ArgumentParser(prog="memmcl data", description="Builds the real-task data folder that configs/real/ reads "
                            "from the public corpora, each pinned to a commit and the SHA-256 of every file.")
    commands = parser.add_subcommands(dest="command")
    p_fetch = ArgumentParser(description="download the pinned source files (resumes; verified before use)")
    p_fetch.add_argument("--dest", type=str, default="sources", help="the source folder (<owner>+<repo>/<path>)")
    p_fetch.add_argument("--repos", type=list[str] | None, default=None, help="only these repositories")
    p_build = ArgumentParser(description="build the data folder from a source folder (offline)")
    p_build.add_argument("--source", type=str, default="sources", help="the source folder (memmcl data fetch --dest)")
    p_build.add_argument("--out", type=str, default="realdata", help="the data folder to write (data_dir)")
    p_build.add_argument("--tasks", type=list[str] | None, default=None, help="only these tasks (default: all)")
    p_build.add_argument("--seed", type=int, default=0, help="the seed of the row order and validation samples")
    p_build.add_argument("--force", type=bool, default=False, help="replace an existing data folder")
    p_check = ArgumentParser(description="read every task of a data folder as a run reads it; print row counts")
    p_check.add_argument("folder", type=str, help="a data folder (memmcl data build --out)")
    p_check.add_argument("--tasks", type=list[str] | None, default=None, help="only these tasks")
    commands.add_subcommand("fetch", p_fetch)
    commands.add_subcommand("build", p_build)
    commands.add_subcommand("check", p_check)
    cfg = parser.parse_args(args)
    sub = cfg[cfg.command]
    if cfg.command == "fetch":
        counts = fetch(sub.dest, sub.repos)
        print(f"{sub.dest}: {counts['downloaded']} file(s) downloaded, {counts['present']} already there, all verified")
    elif cfg.command == "build":
        report = data_build.build(sub.source, sub.out, sub.tasks, sub.seed, sub.force)
        for task, c in report["tasks"].items():
            dropped = c.get("train_test_overlap_dropped", 0) + c.get("dev_test_overlap_dropped", 0)
            print(f"  {task:16s} train {c['train']:6d}  validation {c['validation']:4d}  test overlap dropped {dropped}")
        print(f"{sub.out}: {len(report['tasks'])} task(s); build report {data_build.REPORT}; "
              f"memmcl pipeline ... --data_dir {sub.out}")
    else:
        for task, counts in data_build.check(sub.folder, sub.tasks).items():
            print(f"  {task:16s} " + "  ".join(f"{k} {v}" for k, v in counts.items()))


# The eight verbs of `memmcl`, in the order a newcomer needs them: (one line for `memmcl --help`, handler); a
# handler of None is a LightningCLI subcommand (`memmcl <verb> --help` lists its options).
VERBS: dict[str, tuple[str, object]] = {
    "pipeline": ("the whole method over one run directory: experts, weak data, difficulty, merges, evaluation, "
                 "report (configs/demo/pipeline.yaml)", pipeline_main),
    "report": ("re-render report.md and the plots of a run directory (runs/<name>)", report_main),
    "data": ("build the real-task data folder from the pinned public corpora: fetch, build, check", data_main),
    "fit": ("train a LoRA expert, or one multi-task adapter with the CurriculumSampler (configs/demo/expert.yaml)", None),
    "validate": ("score a model on the validation splits", None),
    "test": ("score a model on the test splits", None),
    "predict": ("write per-example predictions (PredictionWriter)", None),
    "merge": ("evolutionary merge of saved LoRA experts (MergeSearch, configs/demo/merge.yaml)", None),
}


def verb_help() -> str:
    width = max(map(len, VERBS))
    return "\n".join(["usage: memmcl <verb> [--config FILE] [options] [--verbose]", "", "verbs:",
                      *(f"  {v:{width}s}  {text}" for v, (text, _) in VERBS.items()), "",
                      "memmcl <verb> --help lists a verb's options; --verbose keeps library warnings and tracebacks."])


def main(args: list[str] | None = None) -> None:
    """Entry point of the `memmcl` console script."""
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv or os.environ.get("MEMMCL_VERBOSE", "") not in ("", "0")
    if verbose:
        os.environ["MEMMCL_VERBOSE"] = "1"  # worker processes inherit it
    argv = [a for a in argv if a != "--verbose"]
    from memmcl.rundir import quiet_libraries

    quiet_libraries()
    if not argv or argv[0] in ("-h", "--help"):
        print(verb_help())
        return
    if argv[0] not in VERBS:
        print(f"memmcl: error: unknown verb '{argv[0]}'; expected one of {', '.join(VERBS)}", file=sys.stderr)
        raise SystemExit(2)
    try:
        handler = VERBS[argv[0]][1]
        if handler is not None:  # the whole-run verbs have their own parsers (no single model or datamodule)
            return handler(argv[1:])
        MemmclCLI(args=argv)
    except Exception as err:
        # Our own errors (bad settings, files, experts: found through the wrappers of jsonargparse and Lightning) name
        # the field or file, and the environment's (a read-only folder, a missing device) name the path or device:
        # one line, no traceback, unless asked.
        line = None if verbose else one_line_error(err)
        if line is None:
            raise
        print(f"memmcl: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line_error(err: BaseException) -> str | None:
    """Returns the one line to print for memmcl's own error anywhere in `err`'s chain (causes and contexts), for an
    OS error (a path that cannot be read or written) or a Lightning misconfiguration; None for anything else (a bug:
    its traceback is shown)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ValueError) and type(cause).__module__.startswith("memmcl"):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, OSError):
        return f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    if isinstance(err, MisconfigurationException):
        return f"trainer: {str(err).splitlines()[0]}"
    return None


__all__ = ["VERBS", "MemmclCLI", "MemmclTrainer", "TensorBoardLogger", "main"]

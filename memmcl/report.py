"""`memmcl report RUN_DIR`: report.md and PNG plots from a pipeline run directory (re-rendered from its files)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import yaml

from memmcl.experts.kinds import kind_of
from memmcl.precision import describe
from memmcl.roster import FINAL, columns, label
from memmcl.rundir import inside, write_atomic


class ReportError(ValueError):
    """A run directory that lacks what a report needs; the message names the file."""


def _load(path: Path, what: str = "") -> dict:
    """Returns a run file's JSON / plain-YAML mapping; missing, unparsable (a `!!python` tag) or not a mapping is an
    error naming the file."""
    if not path.is_file():
        raise ReportError(f"{path}: missing; {what}")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise ReportError(f"{path}: not readable {path.suffix[1:].upper()} ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: a {type(data).__name__}; expected a dict as memmcl pipeline writes it")
    return data


def cell(text) -> str:
    """A Markdown table cell's text: `|` escaped and HTML's `<`, `>`, `&` as entities."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def accuracy_matrix(results: dict, metric: str = "acc") -> dict[str, dict[str, float]]:
    """Returns {column: {task: value}} with the evolved group merge read on each task of its own group (a run written
    before tasks had their own metric reads accuracy as `metric`)."""
    models, groups = results["models"], results["groups"]
    if metric == "metric":
        models = {m: {t: {"metric": r.get("metric", r["acc"])} for t, r in per.items()} for m, per in models.items()}
    out: dict[str, dict[str, float]] = {}
    for column in columns(models):
        if column == "evolved_group":
            values = {t: models[f"evolved_{g}"][t][metric] for t, g in groups.items() if f"evolved_{g}" in models}
        elif column in models:
            values = {t: r[metric] for t, r in models[column].items()}
        else:
            continue
        if values:
            out[column] = values
    return out


def markdown_table(matrix: dict[str, dict[str, float]], groups: dict[str, str], majority: dict[str, float] | None = None) -> str:
    """Returns a Markdown table: one row per task, then the mean per group and overall; one column per model."""
    names = list(matrix)
    head = ["task", "group", *(["majority"] if majority else []), *(label(c) for c in names)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def row(label: str, group: str, tasks: list[str]) -> str:
        cells = [cell(label), cell(group)]
        if majority:
            cells.append(f"{sum(majority[t] for t in tasks) / len(tasks):.3f}")
        for c in names:
            vals = [matrix[c][t] for t in tasks if t in matrix[c]]
            cells.append(f"{sum(vals) / len(vals):.3f}" if len(vals) == len(tasks) else "")
        return "| " + " | ".join(cells) + " |"

    for t, g in groups.items():
        lines.append(row(t, g, [t]))
    for g in dict.fromkeys(groups.values()):
        lines.append(row(f"**mean {g}**", g, [t for t in groups if groups[t] == g]))
    lines.append(row("**mean**", "all", list(groups)))
    return "\n".join(lines)


def differences_table(differences: list[dict]) -> str:
    """Returns a Markdown table of the claimed differences A − B: value, 95% interval, ✓ where it excludes zero."""
    lines = ["| difference | value | 95% interval | excludes 0 |", "|---|---:|---|:---:|"]
    for d in differences:
        lines.append(f"| {label(d['a'])} − {label(d['b'])} | {d['diff']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] "
                     f"| {'✓' if d['excludes_zero'] else ''} |")
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> str:
    """Writes a figure as PNG atomically (no half-written plot is left behind), closes it; returns the file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path.name


def _plots(out: Path, results: dict, genome: dict, stages: dict, difficulty: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    groups = results["groups"]
    tasks = list(groups)
    matrix = accuracy_matrix(results)

    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks)), 5.5))
    width = 0.8 / len(matrix)
    for i, (column, values) in enumerate(matrix.items()):
        ax.bar(np.arange(len(tasks)) + i * width - 0.4 + width / 2, [values.get(t, np.nan) for t in tasks], width,
               label=label(column))
    ax.scatter(np.arange(len(tasks)), [results["majority"][t] for t in tasks], marker="_", s=400, c="black", zorder=3,
               label="majority class")
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=35, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_title("Test accuracy per task and model")
    written.append(_save_figure(fig, out / "accuracy.png"))

    names = list(genome["coefficients"])
    rows = list(genome["stages"]) + [FINAL]
    weights = np.array([[np.mean(genome["stages"][s]["coefficients"][n]) if s in genome["stages"] else np.nan for n in names]
                        for s in rows[:-1]] + [[np.mean(genome["coefficients"][n]) for n in names]])
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 0.6 * len(rows) + 1.5))
    im = ax.imshow(weights, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (r, c), v in np.ndenumerate(weights):
        if np.isfinite(v) and v != 0:
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < np.nanmax(weights) / 2 else "black")
    fig.colorbar(im, ax=ax, label="coefficient of ΔLoRA")
    ax.set_title("Merge weights per stage (base + Σ w·ΔLoRA)")
    written.append(_save_figure(fig, out / "merge_weights.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, result in stages.items():
        hist = result.get("history", [])
        line = ax.plot([h["generation"] for h in hist], [h["best"] for h in hist], marker="o", label=f"{stage} best")
        ax.plot([h["generation"] for h in hist], [h["mean"] for h in hist], ls="--", color=line[0].get_color(), alpha=0.6,
                label=f"{stage} mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (accuracy on weak data)")
    ax.legend(fontsize=7)
    ax.set_title("Fitness per generation")
    written.append(_save_figure(fig, out / "fitness.png"))

    for stage, result in stages.items():  # NSGA-II: each stage's Pareto front, one line per member, the knee bold
        if not result.get("front"):
            continue
        objectives = result["objectives"]
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(objectives) + 2), 4))
        for member in result["front"]:
            knee = member["genome"] == result["genome"]
            ax.plot(range(len(objectives)), member["objectives"], marker="o", lw=2.5 if knee else 1,
                    color="tab:red" if knee else "tab:gray", alpha=1.0 if knee else 0.5, zorder=3 if knee else 2)
        ax.plot([], [], color="tab:red", lw=2.5, label="knee (the stage's merge)")
        ax.plot([], [], color="tab:gray", label="other front members")
        ax.set_xticks(range(len(objectives)), objectives, rotation=35, ha="right")
        ax.set_ylabel("accuracy on weak data")
        ax.legend(fontsize=7)
        ax.set_title(f"Pareto front of stage {stage} ({len(result['front'])} members)")
        written.append(_save_figure(fig, out / f"pareto_{stage}.png"))

    order = difficulty["order"]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(order) + 1.2))
    ax.barh(range(len(order)), [difficulty["scores"][t] for t in order], color="tab:orange")
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel("difficulty score (weighted mean of z-scored features)")
    ax.set_title("Curriculum order, easy (top) to hard")
    written.append(_save_figure(fig, out / "difficulty.png"))
    return written


def write_report(run_dir: str | Path) -> Path:
    """Renders `<run_dir>/report/report.md` and its PNG plots from the run's files; returns the report's path. A run
    file that parses but lacks what the report reads is an error naming the run directory."""
    try:
        return _write_report(Path(run_dir))
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ReportError(f"{run_dir}: a run file lacks what the report reads ({type(err).__name__}: {err}); re-run "
                          f"memmcl pipeline on it") from err


def _write_report(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory; expected one written by memmcl pipeline")
    results = _load(run_dir / "eval" / "results.json", "run the pipeline's evaluation first (memmcl pipeline)")
    genome = _load(run_dir / "merge" / "best_genome.yaml", "run the pipeline's merge first")
    difficulty = _load(run_dir / "difficulty" / "difficulty.json", "run the pipeline's difficulty phase first")
    stages = {p.parent.name: _load(p) for p in sorted((run_dir / "merge" / "stages").glob("*/result.yaml"))}
    phases = _load(run_dir / "phases.json") if (run_dir / "phases.json").exists() else {}
    out = inside(run_dir, "report")
    out.mkdir(parents=True, exist_ok=True)
    _plots(out, results, genome, stages, difficulty)
    groups = results["groups"]
    lines = [f"# MEM-MCL report: `{run_dir}`", "",
             f"Backbone `{genome.get('backbone')}`, {len(groups)} tasks, merge method `{genome.get('method')}`."]
    if note := kind_of(genome, "best_genome.yaml").note:
        lines.append(note)
    if phases:
        lines.append(f"Wall time of the latest run: {phases.get('wall_seconds')} s.")
    if precision := results.get("precision") or phases.get("precision"):
        lines.append(describe(precision))
    if results.get("max_eval_examples"):
        lines.append(f"Test accuracy over {results['max_eval_examples']} test examples of each task only (a seeded, "
                     "label-stratified sample).")
    metrics = sorted({s["metric"] for s in results.get("metrics", {}).values()} - {"accuracy"})
    lines += ["", "## Test score: each task's standard metric", "",
              "Accuracy unless the task spec names another metric"
              + (f" (here: {', '.join(metrics)}; `tuple_f1` is exact-match micro-F1 over extracted tuples)" if metrics else "")
              + "; group and overall means are means of these.", "",
              markdown_table(accuracy_matrix(results, "metric"), groups), "",
              "## Test accuracy", "", "Extraction tasks: the share of sentences whose predicted tuple set is exactly the "
              "gold set; majority: answering the most frequent label (extraction: `none`).", "",
              markdown_table(accuracy_matrix(results), groups, results["majority"]), "",
              "![accuracy](accuracy.png)", "", "## Test macro-F1", "", "Extraction tasks: tuple micro-F1.", "",
              markdown_table(accuracy_matrix(results, "f1"), groups), ""]
    if results.get("icl"):
        d = results["demonstrations"]
        lines += ["## In-context demonstrations: the order ablation", "",
                  f"The evolved global merge with k = {d['k']} demonstrations ({'one fixed set per task' if d['fixed'] else 'a set per query'}, "
                  f"scope `{d['scope']}`), mean test score (each task's metric) over {d['seeds']} demonstration draws (seeds) and its spread.", "",
                  "| order | mean score | std over seeds | per seed |", "|---|---:|---:|---|"]
        for order, r in results["icl"].items():
            label = "none (zero-shot)" if order == "none" else order
            lines.append(f"| {label} | {r['mean']:.3f} | {r['std']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_seed'])} |")
        lines.append("")
    else:
        lines += ["No in-context ablation: demonstrations.k is 0"
                  + (" because the 2-layer tiny backbone cannot learn in context (demonstrations cost it 10-27 points "
                     "whatever their order; docs/results.md); it runs on a real LLM: make demo-real."
                     if genome.get("backbone") == "tiny" else "."), ""]
    if differences := results.get("differences"):
        d = differences[0]
        lines += ["## Which differences are real", "",
                  "Each row is model A's mean-over-tasks test accuracy (extraction tasks: exact tuple sets) minus model "
                  "B's, with a paired bootstrap 95% "
                  f"interval: {d['resamples']} resamples (seed {d['seed']}) of the test examples, with replacement "
                  "within each task, the same resample for both models; ✓ where the interval excludes zero. Rows with "
                  "demonstrations read each example's correctness as its mean over the demonstration draws.", "",
                  differences_table(differences), ""]
    lines += ["## Merge", "", "| stage | members | uniform fitness | evolved fitness |", "|---|---|---:|---:|"]
    for stage, r in genome["stages"].items():
        lines.append(f"| {cell(stage)} | {cell(', '.join(r['members']))} | {r['uniform_fitness']:.4f} | {r['fitness']:.4f} |")
    ta = genome.get("baselines", {}).get("task_arithmetic")
    if ta:
        grid = ", ".join(f"{k:g}: {v:.4f}" for k, v in ta["fitness_by_scale"].items())
        lines += [f"| task arithmetic (λ = {ta['scale']:g}) | all experts | | {ta['fitness']:.4f} |", "",
                  f"Task arithmetic is base + λ Σ ΔLoRA with λ tuned on the weak data (fitness per λ: {grid})."]
    lines += ["", "Final coefficients: " + ", ".join(f"{n} {sum(v) / len(v):.3f}" for n, v in genome["coefficients"].items()),
              "", "![merge weights](merge_weights.png) ![fitness](fitness.png)", ""]
    lines += [f"![Pareto front {s}](pareto_{s}.png)" for s, r in stages.items() if r.get("front")]
    lines += ["",
              "## Difficulty (curriculum order, easy to hard)", ""]
    from memmcl.curriculum.difficulty import Difficulty, format_difficulty_table

    d = Difficulty(difficulty["scores"], difficulty["normalised"], difficulty["weights"])
    lines += [format_difficulty_table(d, difficulty.get("groups")), "", "![difficulty](difficulty.png)", ""]
    if phases.get("phases"):
        lines += ["## Phases of the latest run", "", "| phase | seconds | skipped |", "|---|---:|---|"]
        lines += [f"| {p} | {r.get('seconds')} | {'yes' if r.get('skipped') else 'no'} |" for p, r in phases["phases"].items()]
        lines.append("")
    report = out / "report.md"
    write_atomic(report, "\n".join(lines).encode())
    return report

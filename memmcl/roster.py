"""The roster of evaluated models: one list of names and labels used by the merge search, the pipeline, the evaluation
and the report.

`FINAL` is the one name of the method's final model, the evolved global merge (the merge search's `final`
candidate, written to `merge/merged/`). `label` knows every name the pipeline can produce, multi-task variants with
any pacing included; `group_means` is the one definition of a model's mean score (overall and per group).
"""

from __future__ import annotations

FINAL = "evolved_global"
# Model name in eval/results.json -> its label, in the method's order; `evolved_group` is composed by the report
# (each group's own merge on that group's tasks, from `evolved_<group>`).
ROSTER = {
    "base": "base (zero-shot)",
    "expert": "expert",
    "uniform": "uniform merge",
    "task_arithmetic": "task arithmetic (tuned λ)",
    "evolved_group": "evolved group merge",
    FINAL: "evolved global merge",
    "multitask": "multi-task LoRA",
    "multitask+curriculum": "multi-task LoRA + curriculum",
    f"{FINAL}+icl": "global + curriculum ICL",
    f"{FINAL}+icl_random": "global + random-order ICL",
    f"{FINAL}+icl_reverse": "global + reverse-order ICL",
}
ICL_MODELS = {"curriculum": f"{FINAL}+icl", "random": f"{FINAL}+icl_random", "reverse": f"{FINAL}+icl_reverse"}
# (A, B): the claim that A's mean test score differs from B's; scored when both were evaluated.
CLAIMS = ((FINAL, "uniform"), (FINAL, "task_arithmetic"), (FINAL, "multitask"), (f"{FINAL}+icl", FINAL),
          (f"{FINAL}+icl", f"{FINAL}+icl_random"), (f"{FINAL}+icl", f"{FINAL}+icl_reverse"), ("expert", "base"))
CURRICULUM_PREFIX = "multitask+curriculum_"


def variant_name(pacing: str) -> str:
    """The multi-task model's name: `multitask` (no pacing), `multitask+curriculum` (root) or
    `multitask+curriculum_<pacing>`."""
    if pacing == "none":
        return "multitask"
    return "multitask+curriculum" if pacing == "root" else f"{CURRICULUM_PREFIX}{pacing}"


def label(name: str) -> str:
    """A model's label in the report: the roster's, a multi-task variant's with its pacing, else the name."""
    if name in ROSTER:
        return ROSTER[name]
    if name.startswith(CURRICULUM_PREFIX):
        return f"multi-task LoRA + curriculum ({name.removeprefix(CURRICULUM_PREFIX)})"
    return name


def columns(models) -> list[str]:
    """The report's model columns for these evaluated names, in the roster's order (`evolved_group` when any group
    merge was evaluated), each multi-task variant after the roster's multi-task models."""
    names = set(models)
    out = [c for c in ROSTER if c in names or c == "evolved_group" and any(
        n.startswith("evolved_") and n != FINAL and "+" not in n for n in names)]
    variants = sorted(n for n in names if n.startswith(CURRICULUM_PREFIX))
    at = out.index("multitask+curriculum") + 1 if "multitask+curriculum" in out else len(out)
    return out[:at] + variants + out[at:]


def group_means(per_task: dict[str, dict], groups: dict[str, str]) -> dict[str, float]:
    """Returns the mean of each task's standard metric overall and per group over the tasks present in `per_task`."""
    out = {"overall": sum(r["metric"] for r in per_task.values()) / len(per_task)}
    for g in dict.fromkeys(groups[t] for t in per_task):
        scores = [r["metric"] for t, r in per_task.items() if groups[t] == g]
        out[g] = sum(scores) / len(scores)
    return out

"""Numeric precision of a run: bf16 where the CPU computes it natively, float32 elsewhere, one resolution for all.

`bf16-mixed` here is what GPU users get from Lightning: the frozen backbone's weights are stored in bfloat16 and
every matmul runs in bf16 under autocast (Lightning's `MixedPrecision` plugin, which covers training, validation,
test and predict steps), while the LoRA weights, their gradients and the optimizer state stay float32. Log-softmax,
losses and attention softmax are computed in float32 (the scorer upcasts). On CPUs with AMX or AVX512-BF16 this
is the default (`trainer.precision: null`); elsewhere, and for tangent experts (forward-mode AD in float32), runs are
float32. `benchmarks/precision.py` measures both side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo) of native bf16 matmuls: Intel AMX tiles, or AVX512 with BF16 dot products.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Lightning's precision values the pipeline passes on (`trainer.precision`).
TRAINER_PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
_SHORT = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's short names
_DTYPE_OF = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-true": "float16", "64-true": "float32"}


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """Returns the native-bf16 flags (`BF16_FLAGS`) this CPU reports; empty where it reports none or cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_FLAGS if f in flags]


@dataclass(frozen=True)
class Precision:
    """How a run computes: `trainer` is Lightning's `precision` argument (None: Lightning's default, 32-true),
    `dtype` the frozen backbone's weights, `reason` why (recorded in phases.json, results.json and the report)."""

    trainer: str | None
    dtype: str
    reason: str

    @property
    def is_float32(self) -> bool:
        return self.dtype == "float32" and self.trainer in (None, "32-true")

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_precision(requested: str | None, accelerator: str = "cpu", dtype: str | None = None,
                      float32_only: str | None = None, flags: list[str] | None = None) -> Precision:
    """Returns the run's precision for `trainer.precision` (None: auto), the accelerator and an explicit backbone
    `dtype` (None: follows the precision). Auto is bf16-mixed on a CPU accelerator whose CPU has native bf16
    (`flags`, default read from the CPU), float32 otherwise and for experts of a kind that refuses anything else
    (`float32_only`: that kind's name, e.g. tangent)."""
    if requested is None:
        flags = cpu_bf16_flags() if flags is None else flags
        if float32_only:
            trainer, reason = None, f"auto: {float32_only} experts run in float32"
        elif accelerator != "cpu":
            trainer, reason = None, f"auto: float32 on accelerator {accelerator!r} (set trainer.precision for bf16)"
        elif flags:
            trainer, reason = "bf16-mixed", f"auto: the CPU has {', '.join(flags)}"
        else:
            trainer, reason = None, "auto: the CPU has no native bf16 (amx_bf16 or avx512_bf16)"
    else:
        trainer = _SHORT.get(str(requested), str(requested))
        if trainer not in TRAINER_PRECISIONS:
            raise ValueError(f"trainer.precision: expected null (auto) or one of {list(TRAINER_PRECISIONS)}, "
                             f"got {requested!r}")
        reason = "trainer.precision"
    resolved = Precision(trainer, dtype, f"{reason}; backbone dtype {dtype} as set") if dtype is not None else \
        Precision(trainer, _DTYPE_OF.get(trainer or "", "float32"), reason)
    if float32_only and not resolved.is_float32:
        raise ValueError(f"trainer.precision: expected null or 32-true with expert.kind: {float32_only} ({float32_only} "
                         f"experts run in float32), got {requested!r} (backbone dtype {resolved.dtype})")
    return resolved


def describe(precision: dict) -> str:
    """One line for the report: what ran and why."""
    trainer = precision.get("trainer") or "32-true"
    return f"Precision: {trainer}, backbone weights {precision.get('dtype')} ({precision.get('reason')})."

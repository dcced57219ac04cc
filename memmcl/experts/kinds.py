"""Expert kinds: how an expert is built, trained, recorded and merged, one registry entry per kind.

A kind names its LightningModule (whose `__init__` defaults are the kind's defaults: `expert.lr: null` means the
kind's own learning rate), what it can do (generate extraction answers, train on demonstrations, run outside float32),
the merge methods it allows, the expert settings only it reads, the scorer a merge of its experts needs, and how
`expert.yaml` records it (`kind: <name>`; a LoRA expert writes nothing, as before kinds). Adding a kind is its own
module plus one `register(ExpertKind(...))` line below; nothing else branches on a kind's name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from memmcl.experts.expert import LoRAExpert
from memmcl.experts.tangent import TangentExpert, clear_jacobians


class KindError(ValueError):
    """An unknown expert kind, or a setting the kind refuses; the message names the field."""


@dataclass(frozen=True)
class ExpertKind:
    """One kind of expert.

    Attributes:
        name: `expert.kind` and `expert.yaml`'s `kind`.
        module: its LightningModule; `module.from_settings(expert, backbone, dtype, seed, export_dir)` builds one.
        generates: evaluates extraction tasks by generation (else classification tasks only).
        demonstrations: can be trained demonstration-aware (`expert.demonstrations`).
        float32_only: refuses bf16 (e.g. forward-mode AD in float32).
        merge_methods: the merge methods its experts allow (None: all).
        settings: the `ExpertConfig` fields only this kind reads (they enter its phase keys, no other kind's).
        off_task: trains against other tasks' prompts (the pipeline gives it `set_off_task`).
        note: what the report says of a run with experts of this kind.
        release: called once every expert is trained: drops what the kind kept for training (tangent: the kept
            Jacobians); None: nothing kept.
        merge_scorer: the class path of the scorer a merge of its experts is scored with (None: the merged network
            itself), built as `scorer(multilora_model, pad_id, n_labels)` by `merging.scorer` (a path, as Lightning's
            `class_path`, because merging sits above experts).
    """

    name: str
    module: type
    generates: bool = True
    demonstrations: bool = True
    float32_only: bool = False
    merge_methods: tuple[str, ...] | None = None
    settings: tuple[str, ...] = ()
    off_task: bool = False
    merge_scorer: str | None = None
    note: str = ""
    release: Callable[[], None] | None = None

    def default(self, field: str):
        """The module's own default of `field` (None where the module has no such argument)."""
        parameter = inspect.signature(self.module.__init__).parameters.get(field)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def record(self) -> dict:
        """What `expert.yaml` and best_genome.yaml record of the kind (nothing for LoRA: files from before kinds)."""
        return {} if self.name == DEFAULT_KIND else {"kind": self.name}


KINDS: dict[str, ExpertKind] = {}
DEFAULT_KIND = "lora"


def register(kind: ExpertKind) -> ExpertKind:
    KINDS[kind.name] = kind
    return kind


def expert_kind(name: str, field: str = "expert.kind") -> ExpertKind:
    """Returns the registered kind `name`; an unknown one is an error naming `field`."""
    if name not in KINDS:
        raise KindError(f"{field}: {name!r} is not an expert kind; expected one of {sorted(KINDS)}")
    return KINDS[name]


def kind_of(meta: dict, source: str = "expert.yaml") -> ExpertKind:
    """Returns the kind an `expert.yaml` (or best_genome.yaml) records: `kind: <name>`, or an earlier version's
    `tangent:` entry, else LoRA."""
    if "kind" in meta:
        return expert_kind(str(meta["kind"]), f"{source}: field 'kind'")
    return KINDS["tangent"] if meta.get("tangent") else KINDS[DEFAULT_KIND]


register(ExpertKind(DEFAULT_KIND, LoRAExpert))
register(ExpertKind("tangent", TangentExpert, generates=False, demonstrations=False, float32_only=True,
                    merge_methods=("linear",), settings=("off_task_weight", "off_task_prompts"), off_task=True,
                    merge_scorer="memmcl.merging.tangent.TangentScorer", release=clear_jacobians,
                    note="Tangent experts (`expert.kind: tangent`): each expert, merge and multi-task adapter of this "
                         "table is scored in the tangent model, the backbone's first-order expansion in the adapter; "
                         "the multi-task rows are one tangent adapter trained on every task. peft loading an exported "
                         "adapter builds a different model (the delta inside the network)."))

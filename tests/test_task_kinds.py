"""Task kinds behind one registry (`memmcl.tasks.kinds`): a new kind is its module plus one `KINDS` line, and no module
outside the kinds' own branches on a kind's name."""

import ast
import json
from pathlib import Path

import pytest

from memmcl.encoding import encode_examples
from memmcl.tasks import kinds
from memmcl.tasks.kinds import KINDS, TaskKind, generated_record
from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import TaskError, load_task_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
OWN = {"tasks/kinds.py", "tasks/classification.py", "tasks/extraction.py"}

# A kind of its own, as a user would add it: a classification whose label words are numbers on a scale and whose
# prompt asks for one; its own spec field `scale_words` names the scale in the prompt's last line.
RATING = '''
from dataclasses import dataclass

from memmcl.tasks.classification import Classification
from memmcl.tasks.fields import TaskError


@dataclass(frozen=True)
class Rating(Classification):
    scale_words: str = "1 (worst) to 5 (best)"

    name = "rating"
    keys = ("scale_words",)
    string_keys = ("scale_words",)

    @classmethod
    def from_fields(cls, data, source, labels):
        if not all(str(a).isdigit() for a in data["labels"].values()):
            raise TaskError(f"{source}: field 'labels': a rating task answers with numbers")
        return cls(scale_words=data.get("scale_words", cls.scale_words))

    @property
    def ask(self):
        return f"Answer with one number, {self.scale_words}."

    def to_dict(self, out):
        out.update(kind=self.name, scale_words=self.scale_words)
'''


@pytest.fixture
def rating_kind(tmp_path, monkeypatch):
    (tmp_path / "rating_kind.py").write_text(RATING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(KINDS, "rating", "rating_kind:Rating")
    kinds.kind_class.cache_clear()
    yield
    kinds.kind_class.cache_clear()


def rating_spec(tmp_path, **extra):
    rows = [{"id": f"r{i}", "text": f"review {i}", "label": str(1 + i % 5)} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return spec_from_dict({"name": "stars", "group": "SC", "instruction": "Rate the review.", "kind": "rating",
                           "labels": {str(k): str(k) for k in range(1, 6)}, "splits": {"train": "train.jsonl"},
                           **extra}, source=str(tmp_path / "stars.yaml"))


def test_a_new_kind_is_its_module_and_one_registry_line(rating_kind, tmp_path, tiny):
    spec = rating_spec(tmp_path, scale_words="1 (awful) to 5 (superb)")
    assert spec.kind == "rating" and spec.task_kind.scale_words == "1 (awful) to 5 (superb)"
    again = spec_from_dict(spec.to_dict(), source="again")  # its own field round-trips through expert.yaml
    assert again.task_kind == spec.task_kind and again.to_dict() == spec.to_dict()
    examples = read_split(spec, "train")  # rows read as a classification's (inherited), no reader names the kind
    assert [e.label for e in examples[:5]] == [0, 1, 2, 3, 4]
    _, tokenizer = tiny
    items = encode_examples(tokenizer, spec, 0, examples, max_length=64)  # scored: every label word is an answer
    assert len(items[0]["answers"]) == 5 and items[3]["label"] == 3
    with pytest.raises(TaskError, match=r"stars.yaml: field 'labels': a rating task answers with numbers"):
        rating_spec(tmp_path, labels={"bad": "awful", "good": "great"})
    with pytest.raises(TaskError, match=r"field\(s\) \['scale_words'\] belong to rating tasks; set kind: rating"):
        spec_from_dict({"name": "c", "group": "SC", "instruction": "x", "labels": {"a": "a", "b": "b"},
                        "splits": {"train": "x.jsonl"}, "scale_words": "1 to 5"})
    with pytest.raises(TaskError, match=r"field 'scale_words' is a list; expected a string"):
        rating_spec(tmp_path, scale_words=["1", "5"])


def test_the_chat_prompt_asks_as_the_kind_says(rating_kind, tmp_path):
    from memmcl.tasks.prompts import build_prompt

    spec = rating_spec(tmp_path)

    class Chat:  # the smallest tokenizer with a chat template: characters as ids
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return messages[-1]["content"]

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    ids = build_prompt(Chat(), spec, read_split(spec, "train")[0], max_length=400)
    assert "".join(map(chr, ids)).endswith("Answer with one number, 1 (worst) to 5 (best).")


def test_unknown_kinds_and_formats_of_another_kind_are_named(tmp_path):
    with pytest.raises(TaskError, match=r"t.yaml: field 'kind' is 'ranking'; expected one of \['classification', "
                                        r"'extraction'\]"):
        spec_from_dict({"name": "t", "group": "SC", "instruction": "x", "labels": {"a": "a", "b": "b"},
                        "splits": {"train": "x.jsonl"}, "kind": "ranking"}, source="t.yaml")
    with pytest.raises(TaskError, match=r"t.yaml: field 'splits.train.format' is 'absa_lines', which holds extraction "
                                        r"answers; task 't' is a classification task \(set kind: extraction\)"):
        spec_from_dict({"name": "t", "group": "SC", "instruction": "x", "labels": {"a": "a", "b": "b"},
                        "splits": {"train": {"path": "x.txt", "format": "absa_lines"}}}, source="t.yaml")


def test_records_say_how_they_were_scored():
    spec = load_task_spec("uabsa_synthetic")
    assert spec.task_kind.generates and not load_task_spec("sc_binary").task_kind.generates
    assert generated_record({"kind": "extraction", "scores": {"gold": -1.0}})
    assert not generated_record({"gold": "pos", "scores": {"pos": -1.0, "neg": -2.0}})


def test_no_module_outside_the_kinds_names_a_task_kind():
    """Branches on a task kind's name (`kind == "extraction"`, `.extraction`) live in the kinds' modules only."""
    names = set(KINDS)
    found = []
    for path in [*(ROOT / "memmcl").rglob("*.py"), *(ROOT / "callbacks").rglob("*.py")]:
        rel = path.relative_to(ROOT / "memmcl").as_posix() if "memmcl" in path.parts else path.name
        if rel in OWN:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c in names for c in consts):
                    found.append(f"{rel}:{node.lineno} compares with a kind's name")
            elif isinstance(node, ast.Attribute) and node.attr in names:
                found.append(f"{rel}:{node.lineno} reads .{node.attr}")
    assert not found, "\n".join(found)
    assert issubclass(kinds.kind_class("extraction"), TaskKind)


def test_a_broken_registry_entry_and_a_direct_spec(monkeypatch):
    from memmcl.tasks.extraction import Extraction
    from memmcl.tasks.spec import TaskSpec

    monkeypatch.setitem(KINDS, "ranking", "no_such_module:Ranking")
    kinds.kind_class.cache_clear()
    try:
        with pytest.raises(TaskError, match=r"task kind 'ranking': its registry entry 'no_such_module:Ranking' does not load"):
            spec_from_dict({"name": "t", "group": "SC", "instruction": "x", "labels": {"a": "a", "b": "b"},
                            "splits": {"train": "x.jsonl"}})
    finally:
        monkeypatch.delitem(KINDS, "ranking")
        kinds.kind_class.cache_clear()
    # a spec built in code takes its kind's default metric, and round-trips
    spec = TaskSpec(name="u", group="ABSA", labels=("negative", "positive"), answers=("negative", "positive"),
                    instruction="List pairs.", splits={"train": "x.jsonl"},
                    task_kind=Extraction(slots=("aspect", "sentiment"), file_slots=("aspect", "sentiment"),
                                         spans=("aspect",)))
    assert spec.metric == "tuple_f1" and spec_from_dict(spec.to_dict()).task_kind == spec.task_kind

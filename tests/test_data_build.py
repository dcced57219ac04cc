"""`memmcl data`: fixture copies of the source formats, written here, build the expected files; hashes, leaks, resumes."""

import csv
import io
import json
import urllib.request

import pytest

from memmcl.data import build as data_build
from memmcl.data.fetch import fetch
from memmcl.data.recipes import RECIPES
from memmcl.data.sources import DataBuildError, Source, file_sha256, load_sources

GEN = "IsakZhang/Generative-ABSA"
QUAD = "IsakZhang/ABSA-QUAD"
FIXTURES = {
    (GEN, "data/uabsa/rest15/train.txt"): ["The staff was rude .####[([1], 'NEG')]",
                                           "Great pizza and cheap beer .####[([1], 'POS'), ([4], 'POS')]",
                                           "We left .####[]",
                                           "The battery life is short .####[([1, 2], 'NEG')]"],
    (GEN, "data/uabsa/rest15/dev.txt"): ["Nice view .####[([1], 'POS')]", "Slow service .####[([1], 'NEG')]"],
    (GEN, "data/uabsa/rest15/test.txt"): ["we  LEFT .####[]"],  # the same text as a training row, normalised
    (QUAD, "data/rest15/train.txt"): ["The food was great .####[['food', 'food quality', 'positive', 'great']]",
                                      "Worth it .####[['NULL', 'restaurant prices', 'positive', 'Worth']]"],
    (QUAD, "data/rest15/dev.txt"): ["Bad wine .####[['wine', 'drinks quality', 'negative', 'Bad']]"],
    (QUAD, "data/rest15/test.txt"): ["Other .####[]"],
}


@pytest.fixture
def sources(tmp_path):
    """A source folder of fixture files and the sources pinned to their hashes."""
    root = tmp_path / "sources"
    files: dict[str, dict[str, str]] = {}
    for (repo, path), lines in FIXTURES.items():
        local = root / repo.replace("/", "+") / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("\n".join(lines) + "\n")
        files.setdefault(repo, {})[path] = file_sha256(local)
    return root, {repo: Source(repo, "0" * 40, f) for repo, f in files.items()}


def rows(path):
    return list(csv.DictReader(path.open(encoding="utf-8")))


def test_build_writes_the_layout_configs_real_reads(sources, tmp_path):
    root, pinned = sources
    out = tmp_path / "realdata"
    report = data_build.build(root, out, ["uabsa_rest15", "asqp_rest15"], sources=pinned)
    uabsa = {r["text"]: r for r in rows(out / "uabsa_rest15" / "train.csv")}
    # the row whose text stands in the test split is dropped, and counted
    assert set(uabsa) == {"The staff was rude .", "Great pizza and cheap beer .", "The battery life is short ."}
    assert report["tasks"]["uabsa_rest15"]["train_test_overlap_dropped"] == 1
    assert uabsa["The battery life is short ."]["label_text"] == "[('battery life', 'negative')]"  # index spans -> words
    assert uabsa["Great pizza and cheap beer ."]["label_text"] == "[('pizza', 'positive'), ('beer', 'positive')]"
    assert {r["id"] for r in uabsa.values()} == {f"uabsa_rest15-train-{i}" for i in range(3)}
    assert len(rows(out / "uabsa_rest15" / "validation.csv")) == 2  # the standard dev split
    quad = {r["text"]: r["label_text"] for r in rows(out / "asqp_rest15" / "train.csv")}
    assert quad["Worth it ."] == "[('restaurant prices', 'NULL', 'Worth', 'positive')]"  # slot order of the spec
    assert report["tasks"]["asqp_rest15"] == {"source": {"train": 2, "dev": 1, "test": 1}, "train_test_overlap_dropped": 0,
                                              "dev_test_overlap_dropped": 0, "train": 2, "validation": 1}
    assert json.loads((out / data_build.REPORT).read_text())["tasks"].keys() == {"uabsa_rest15", "asqp_rest15"}
    # read back as a run reads it, through the shipped specs
    assert data_build.check(out, ["uabsa_rest15", "asqp_rest15"]) == {"uabsa_rest15": {"train": 3, "validation": 2},
                                                                      "asqp_rest15": {"train": 2, "validation": 1}}


def test_build_is_seeded(sources, tmp_path):
    root, pinned = sources
    a = data_build.build(root, tmp_path / "a", ["uabsa_rest15"], seed=3, sources=pinned)
    data_build.build(root, tmp_path / "b", ["uabsa_rest15"], seed=3, sources=pinned)
    assert a["seed"] == 3
    for split in ("train", "validation"):
        assert (tmp_path / "a" / "uabsa_rest15" / f"{split}.csv").read_bytes() == \
            (tmp_path / "b" / "uabsa_rest15" / f"{split}.csv").read_bytes()


def test_a_tampered_file_fails_the_hash_check_by_name(sources, tmp_path):
    root, pinned = sources
    test_file = root / "IsakZhang+Generative-ABSA" / "data/uabsa/rest15/test.txt"
    test_file.write_text(test_file.read_text() + "One more .####[]\n")
    with pytest.raises(DataBuildError, match=r"IsakZhang/Generative-ABSA@000000000000:data/uabsa/rest15/test.txt: "
                                             r"SHA-256 .* expected"):
        data_build.build(root, tmp_path / "out", ["uabsa_rest15"], sources=pinned)
    test_file.unlink()
    with pytest.raises(DataBuildError, match=r"data/uabsa/rest15/test.txt: missing; expected it at"):
        data_build.build(root, tmp_path / "out", ["uabsa_rest15"], sources=pinned)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_build_leaves_no_folder_and_a_rerun_completes(sources, tmp_path, monkeypatch):
    root, pinned = sources
    real_write = data_build.write_csv
    calls = []

    def crash(path, table, columns):
        calls.append(path)
        if len(calls) == 3:  # the second task's first file
            raise KeyboardInterrupt
        real_write(path, table, columns)

    monkeypatch.setattr(data_build, "write_csv", crash)
    with pytest.raises(KeyboardInterrupt):
        data_build.build(root, tmp_path / "out", ["asqp_rest15", "uabsa_rest15"], sources=pinned)
    assert list(tmp_path.iterdir()) == [root]  # neither the folder nor its temporary sibling
    monkeypatch.setattr(data_build, "write_csv", real_write)
    data_build.build(root, tmp_path / "out", ["asqp_rest15", "uabsa_rest15"], sources=pinned)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["asqp_rest15", data_build.REPORT, "uabsa_rest15"]
    with pytest.raises(DataBuildError, match="already exists"):
        data_build.build(root, tmp_path / "out", ["uabsa_rest15"], sources=pinned)


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, status: int):
        super().__init__(data)
        self.status = status


def test_fetch_resumes_and_verifies(sources, tmp_path):
    root, pinned = sources
    served = {}
    for (repo, path), _ in FIXTURES.items():
        served[pinned[repo].url(path)] = (root / repo.replace("/", "+") / path).read_bytes()
    requests = []

    def opener(request: urllib.request.Request):
        requests.append(request)
        data = served[request.full_url]
        start = int(request.get_header("Range", "bytes=0-")[6:-1])
        return FakeResponse(data[start:], 206 if start else 200)

    dest = tmp_path / "dest"
    target = dest / "IsakZhang+ABSA-QUAD" / "data/rest15/train.txt"
    target.parent.mkdir(parents=True)
    full = served[pinned[QUAD].url("data/rest15/train.txt")]
    (target.parent / "train.txt.part").write_bytes(full[:10])  # an interrupted download
    assert fetch(dest, opener=opener, sources=pinned) == {"downloaded": len(FIXTURES), "present": 0}
    resumed = [r for r in requests if r.full_url.endswith("rest15/train.txt") and "ABSA-QUAD" in r.full_url]
    assert resumed[0].get_header("Range") == "bytes=10-" and target.read_bytes() == full
    assert fetch(dest, opener=opener, sources=pinned) == {"downloaded": 0, "present": len(FIXTURES)}
    data_build.build(dest, tmp_path / "out", ["uabsa_rest15"], sources=pinned)  # builds from what it fetched
    # a server that sends other bytes: named, removed, never used
    served[pinned[GEN].url("data/uabsa/rest15/dev.txt")] = b"tampered\n"
    (dest / "IsakZhang+Generative-ABSA" / "data/uabsa/rest15/dev.txt").unlink()
    with pytest.raises(DataBuildError, match=r"data/uabsa/rest15/dev.txt: downloaded SHA-256 .* removed"):
        fetch(dest, opener=opener, sources=pinned)
    assert not (dest / "IsakZhang+Generative-ABSA" / "data/uabsa/rest15/dev.txt").exists()


def test_every_task_has_pinned_files_and_a_real_spec():
    pinned = load_sources()
    for task, recipe in RECIPES.items():
        assert set(recipe.files.values()) <= set(pinned[recipe.repo].files), task
        assert data_build.real_spec(task).exists(), task
        assert len(pinned[recipe.repo].commit) == 40

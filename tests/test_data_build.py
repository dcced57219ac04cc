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
SST, TWEETEVAL, ASC = "prrao87/fine-grained-sentiment", "cardiffnlp/tweeteval", "gaozhengjie/ABSA-Data-Set"
S17 = "cbaziotis/datastories-semeval2017-task4"
FIXTURES = {
    (SST, "data/sst/sst_train.txt"): ["__label__5\tA joy .", "__label__3\tIt exists .", "__label__1\tDull , dull .",
                                      "__label__2\tNo. .", "__label__4\tSeen it before ."],
    (SST, "data/sst/sst_dev.txt"): ["__label__4\tFine .", "__label__2\tWeak .", "__label__3\tMeh ."],
    (SST, "data/sst/sst_test.txt"): ["__label__2\tNo . .", "__label__3\tseen it before"],  # normalised: = train
    (TWEETEVAL, "datasets/hate/mapping.txt"): ["0\tnot-hate", "1\thate"],
    (TWEETEVAL, "datasets/hate/train_text.txt"): ["I love this ", "", "Go away you lot ", "same as dev "],
    (TWEETEVAL, "datasets/hate/train_labels.txt"): ["0", "0", "1", "0"],
    (TWEETEVAL, "datasets/hate/val_text.txt"): ["Same as   DEV", "nice day"],
    (TWEETEVAL, "datasets/hate/val_labels.txt"): ["0", "0"],
    (TWEETEVAL, "datasets/hate/test_text.txt"): ["a test tweet"],
    (TWEETEVAL, "datasets/hate/test_labels.txt"): ["1"],
    (S17, "dataset/Subtask_A/gold/SemEval2017-task4-test.subtask-A.english.txt"): ["9\tneutral\tA test tweet"],
    **{(S17, f"dataset/Subtask_A/downloaded/twitter-{f}-A.tsv"): [] for f in (
        "2015train", "2016train", "2013dev", "2016dev", "2016devtest", "2013test", "2014test", "2015test", "2016test",
        "2014sarcasm")},
    (S17, "dataset/Subtask_A/downloaded/twitter-2013train-A.tsv"): [
        "1\tpositive\tGreat game @bob http://t.co/x", "1\tpositive\tGreat game again", "2\tnegative\tso sad \\u2019",
        "3\tnegative\tGreat game @ann", "4\tneutral\tNice day"],
    (TWEETEVAL, "datasets/sentiment/mapping.txt"): ["0\tnegative", "1\tneutral", "2\tpositive"],
    (TWEETEVAL, "datasets/sentiment/val_text.txt"): ["nice day https://x.y/z ", "@carl meh"],
    (TWEETEVAL, "datasets/sentiment/val_labels.txt"): ["2", "1"],
    (TWEETEVAL, "datasets/stance/mapping.txt"): ["0\tnone", "1\tagainst", "2\tfavor"],
    **{(TWEETEVAL, f"datasets/stance/{d}/{s}_{k}.txt"): ([f"{d} {s} tweet"] if k == "text" else ["2"])
       for d in ("abortion", "atheism", "climate", "feminist", "hillary") for s in ("train", "val", "test")
       for k in ("text", "labels")},
    (ASC, "V1去除conflict/Restaurants_Train.xml.seg"): ["The $T$ was good but the service slow .", "food", "1",
                                                       "The food was good but the $T$ slow .", "service", "-1",
                                                       "Nice $T$ .", "view", "1"],
    (ASC, "V1去除conflict/Restaurants_Test_Gold.xml.seg"): ["The $T$ is fine .", "menu", "0"],
}
FIXTURES.update({
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
})


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
                                              "dev_test_overlap_dropped": 0, "train_dev_overlap_dropped": 0,
                                              "train": 2, "validation": 1}
    assert json.loads((out / data_build.REPORT).read_text())["tasks"].keys() == {"uabsa_rest15", "asqp_rest15"}
    # read back as a run reads it, through the shipped specs
    assert data_build.check(out, ["uabsa_rest15", "asqp_rest15"]) == {"uabsa_rest15": {"train": 3, "validation": 2},
                                                                      "asqp_rest15": {"train": 2, "validation": 1}}


def test_classification_sources_build_with_their_labels_and_ids(sources, tmp_path, monkeypatch):
    root, pinned = sources
    monkeypatch.setattr(data_build, "MAX_VALIDATION", 2)
    report = data_build.build(root, tmp_path / "out", ["sst2", "sst5", "hate", "asc_rest14"], sources=pinned)
    sst5 = {r["text"]: (r["id"], r["label_text"]) for r in rows(tmp_path / "out" / "sst5" / "train.csv")}
    # `No. .` and `Seen it before .` stand in test (letters and digits compared): dropped
    assert sst5 == {"A joy .": ("sst-train-1", "very positive"), "It exists .": ("sst-train-2", "neutral"),
                    "Dull , dull .": ("sst-train-3", "very negative")}
    assert {r["text"] for r in rows(tmp_path / "out" / "sst2" / "train.csv")} == {"A joy .", "Dull , dull ."}
    assert {r["label_text"] for r in rows(tmp_path / "out" / "sst2" / "validation.csv")} <= {"positive", "negative"}
    assert len(rows(tmp_path / "out" / "sst5" / "validation.csv")) == 2  # the dev split, sampled to MAX_VALIDATION
    hate = rows(tmp_path / "out" / "hate" / "train.csv")
    # the empty line is skipped; 'same as dev' is in the dev split (normalised): dropped from train
    assert sorted((r["id"], r["text"], r["label_text"]) for r in hate) == [
        ("tweeteval-hate-train-1", "I love this", "non-hate"), ("tweeteval-hate-train-3", "Go away you lot", "hate")]
    assert report["tasks"]["hate"]["train_dev_overlap_dropped"] == 1
    asc_train = rows(tmp_path / "out" / "asc_rest14" / "train.csv")
    asc_val = rows(tmp_path / "out" / "asc_rest14" / "validation.csv")
    # no dev split: whole sentences held out (both aspects of the first sentence stay together)
    assert {r["text"] for r in asc_train}.isdisjoint({r["text"] for r in asc_val})
    assert len(asc_train) + len(asc_val) == 3 and len(asc_val) in (1, 2)
    assert {(r["id"], r["aspect"], r["label_text"]) for r in asc_train + asc_val} == {
        ("rest14-train-1", "food", "positive"), ("rest14-train-2", "service", "negative"),
        ("rest14-train-3", "view", "positive")}
    assert data_build.check(tmp_path / "out", ["sst5", "hate", "asc_rest14"])["hate"] == {"train": 2, "validation": 2}


def test_twitter_and_stance_sources(sources, tmp_path):
    root, pinned = sources
    report = data_build.build(root, tmp_path / "out", ["twitter", "stance"], sources=pinned)
    twitter = sorted((r["id"], r["text"], r["label_text"]) for r in rows(tmp_path / "out" / "twitter" / "train.csv"))
    # mentions -> @user, URLs dropped, \u escapes decoded; one row per tweet id and per text; 'Nice day' is in dev
    assert twitter == [("semeval17-1", "Great game @user", "positive"), ("semeval17-2", "so sad \u2019", "negative")]
    assert report["tasks"]["twitter"]["train_duplicates_dropped"] == 1 and report["tasks"]["twitter"]["source"]["train"] == 4
    assert report["tasks"]["twitter"]["train_dev_overlap_dropped"] == 1
    validation = sorted((r["id"], r["text"]) for r in rows(tmp_path / "out" / "twitter" / "validation.csv"))
    assert validation == [("tweeteval-sentiment-val-1", "nice day"), ("tweeteval-sentiment-val-2", "@user meh")]
    stance = {r["domain"]: (r["id"], r["label_text"]) for r in rows(tmp_path / "out" / "stance" / "train.csv")}
    assert stance["climate"] == ("tweeteval-stance-climate-train-1", "favor") and len(stance) == 5
    assert data_build.check(tmp_path / "out", ["stance"]) == {"stance": {"train": 5, "validation": 5}}


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
        for repo in recipe.repos:
            assert {p for f in recipe.files.values() for r, p in f if r == repo} <= set(pinned[repo].files), task
            assert len(pinned[repo].commit) == 40
        assert data_build.real_spec(task).exists(), task


def test_the_data_verb_prints_one_line_errors(tmp_path, capsys):
    from memmcl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "build", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--source" in err and "no such folder" in err
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit):
        main(["data", "build", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--tasks", "[sst2]"])
    assert "prrao87/fine-grained-sentiment@a4401669eecb:data/sst/sst_" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

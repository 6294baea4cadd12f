"""The evaluator: STR 36-char protocol, case-sensitive accuracy, NED, reports and ``safl eval``.

Known accuracies come from a tiny model that has really memorised six rendered words
(``model_support.memorise``) and a hand-made labelled folder whose labels differ from
what it reads in chosen ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import render_word
from model_support import Memorised, memorise
from PIL import Image

from model import PreprocessConfig, save_checkpoint
from model.calibration import reliability
from model.training.cli import main as cli_main
from model.training.data import ArrayDataset, load_folder, load_folder_part
from model.training.evaluate import DatasetResult, Example, evaluate, lexicon_accuracy, normalize_36, normalize_cs, predict, score, to_json, to_markdown

# (image of the word the model reads, label in the folder): what each case checks
CASES = [
    ("cat", "cat"),  # right in both protocols
    ("house", "HOUSE"),  # right ignoring case only
    ("TREE", "tree!"),  # right ignoring case and punctuation only
    ("river42", "river 42"),  # spaces never count
    ("Moon", "Noon"),  # wrong: NED 0.75
    ("zebra", "!!"),  # nothing left under the 36-char protocol: skipped there, wrong case-sensitively
    ("cat", ""),  # empty label: skipped by both
]


@pytest.fixture(scope="module")
def memorised() -> Memorised:
    m = memorise()
    assert [r.text for r in m.model.recognize(m.images)] == m.words
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "handmade"
    path.mkdir()
    lines = []
    for i, (word, label) in enumerate(CASES):
        render_word(word).save(path / f"{i}.png")
        lines.append(f"{i}.png\t{label}")
    (path / "labels.tsv").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, memorised: Memorised) -> Path:
    path = tmp_path_factory.mktemp("w") / "memorised.safetensors"
    save_checkpoint(memorised.model, path, name="memorised")
    return path


def test_normalize_36() -> None:
    assert normalize_36("Hello") == "hello"
    assert normalize_36("HELLO, World!") == "helloworld"
    assert normalize_36("  a b\tc ") == "abc"
    assert normalize_36("$12.50") == "1250"
    assert normalize_36("café") == "cafe"  # accented letters count as their base letter
    assert normalize_36("straße") == "strae"  # other non-ASCII letters are not in the 36 classes
    assert normalize_36("!?.") == ""
    assert normalize_36("") == ""


def test_normalize_cs() -> None:
    assert normalize_cs("New York") == "NewYork"
    assert normalize_cs(" Tab\there\n") == "Tabhere"
    assert normalize_cs("It's") == "It's"


def test_score_known_values() -> None:
    preds = ["hello", "World", "ab", "x", "zebra", "anything"]
    labels = ["Hello!", "World", "abcd", "", "...", "  "]
    n, acc36, acc_cs, one_minus_ned = score(preds, labels)
    # 36-char: "hello"✓, "world"✓, "abcd" vs "ab" ✗ (NED 0.5); "", "...", "  " skipped.
    assert n == 3
    assert acc36 == pytest.approx(2 / 3)
    assert one_minus_ned == pytest.approx((1 + 1 + 0.5) / 3)
    # Case-sensitive: "Hello!" ✗, "World" ✓, "abcd" ✗, "..." ✗; "" and "  " skipped.
    assert acc_cs == pytest.approx(1 / 4)


def test_score_edge_cases() -> None:
    assert score([], []) == (0, 0.0, 0.0, 0.0)
    assert score(["", ""], ["a", "bb"]) == (2, 0.0, 0.0, 0.0)
    assert score(["ab"], ["AB"]) == (1, 1.0, 0.0, 1.0)


def _expected_result(name: str) -> DatasetResult:
    return DatasetResult(name, n=5, acc36=4 / 5, acc_cs=2 / 6, one_minus_ned=(4 + 0.75) / 5)


def test_evaluate_on_a_handmade_folder(memorised: Memorised, folder: Path) -> None:
    ds = load_folder(folder, memorised.model.config.preprocess)
    preds, confs = predict(memorised.model, ds.images, batch_size=3)  # several batches
    assert preds == [word for word, _ in CASES]
    assert all(0.0 < c <= 1.0 for c in confs)

    (result,) = evaluate(memorised.model, [ds], batch_size=4, worst=5)
    want = _expected_result("handmade")
    assert (result.name, result.n) == (want.name, want.n)
    assert result.acc36 == pytest.approx(want.acc36)
    assert result.acc_cs == pytest.approx(want.acc_cs)
    assert result.one_minus_ned == pytest.approx(want.one_minus_ned)
    # Only the 36-char mistake is listed (the "!!" label has nothing to compare), with its file.
    assert [(e.index, e.file, e.label, e.prediction) for e in result.worst] == [(4, "4.png", "Noon", "Moon")]
    assert 0.0 < result.worst[0].confidence <= 1.0
    assert result.folder == str(folder)

    (none,) = evaluate(memorised.model, [ds], worst=0)
    assert none.worst == [] and none.acc36 == pytest.approx(want.acc36)


def test_evaluation_reads_a_tall_crop_as_the_service_does(tmp_path: Path) -> None:
    memorised = memorise(use_tps=False)  # as test_model.memorised_without_tps
    # Vertical signs: the words written bottom to top in crops taller than wide.
    for i, word in enumerate(memorised.words):
        render_word(word).transpose(Image.Transpose.ROTATE_90).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.tsv").write_text("".join(f"{i}.png\t{w}\n" for i, w in enumerate(memorised.words)))
    ds = load_folder(tmp_path, memorised.model.config.preprocess)
    upright_only, _ = predict(memorised.model, ds.images)
    assert upright_only != memorised.words
    turned, _ = predict(memorised.model, ds.images, batch_size=4, extra_views=ds.extra_views)
    assert turned == memorised.words
    (result,) = evaluate(memorised.model, [ds])
    assert result.acc36 == 1.0 and result.acc_cs == 1.0


def test_worst_mistakes_are_sorted_by_confidence(memorised: Memorised) -> None:
    m = memorised
    wrong = ArrayDataset("wrong", m.images.add(1).mul(127.5).round().byte().squeeze(1).numpy(), ["x1", "x2", "x3", "x4", "x5", "x6"])
    (result,) = evaluate(m.model, [wrong], worst=3)
    assert result.acc36 == 0.0 and len(result.worst) == 3
    confs = [e.confidence for e in result.worst]
    assert confs == sorted(confs, reverse=True)


def test_a_lexicon_of_the_label_and_distractors_corrects_a_near_miss(memorised: Memorised) -> None:
    m = memorised
    labels = ["Noon" if w == "Moon" else w for w in m.words]  # the "Moon" crop is labelled Noon: read greedily, it is wrong
    ds = ArrayDataset("near", m.images.add(1).mul(127.5).round().byte().squeeze(1).numpy(), labels)
    (plain,) = evaluate(m.model, [ds])
    assert plain.acc36 == pytest.approx(5 / 6)
    # Distractors this toy model never saw: it gives its six words' other crops high
    # probabilities, so they would beat Noon (the model's 3e-7 for it; dog 2e-11, Tree42 9e-15).
    n, acc = lexicon_accuracy(m.model, ds, 2, distractors_from=["dog", "Tree42"])
    assert (n, acc) == (6, 1.0)  # Noon is the likeliest word of its lexicon for the crop
    with pytest.raises(ValueError, match="fewer than a lexicon of 50"):
        lexicon_accuracy(m.model, ds, 50)


def test_samples_keep_their_file_names_through_subsets_and_filters(folder: Path) -> None:
    ds = load_folder(folder, PreprocessConfig(), view_cfg=None)
    assert ds.sources == [f"{i}.png" for i in range(len(CASES))] and ds.folder == str(folder)
    sub = ds.subset([4, 1])
    assert (sub.sources, sub.labels, sub.folder) == (["4.png", "1.png"], ["Noon", "HOUSE"], str(folder))
    from model.charset import Charset

    kept = ds.filtered(Charset(), 25)  # drops the empty label
    assert kept.sources == [f"{i}.png" for i, (_, label) in enumerate(CASES) if label.replace(" ", "")]
    val = load_folder_part(folder, PreprocessConfig(), "val")
    assert len(val.sources) == len(val) and set(val.sources) <= set(ds.sources)
    assert ArrayDataset("d", ds.images[:2], ["a", "b"]).subset([1]).sources == []  # no names: none made up


def test_to_markdown_and_json(tmp_path: Path) -> None:
    a = DatasetResult("iiit5k", 3000, 0.9, 0.8, 0.95, [Example(3, "Hello", "Hella", 0.91, "crops/3.png")], "data/iiit5k")
    b = DatasetResult("svt", 1000, 0.5, 0.4, 0.75, [Example(7, "Exit", "Fxit", 0.5)])
    md = to_markdown([a, b], "model@abc")
    assert md.startswith("### model@abc\n")
    assert "| iiit5k | 3000 | 90.00 % | 80.00 % | 0.9500 |" in md
    assert "| svt | 1000 | 50.00 % | 40.00 % | 0.7500 |" in md
    assert "| **all (weighted)** | 4000 | 80.00 % | 70.00 % | 0.9000 |" in md
    assert "Most confident mistakes on iiit5k (in `data/iiit5k`):" in md
    assert "- `crops/3.png`: `Hello` → `Hella` (confidence 0.91)" in md
    assert "Most confident mistakes on svt:" in md and "- sample 7: `Exit` → `Fxit` (confidence 0.50)" in md  # no file known
    assert "Calibration error" not in md  # results without confidences to score
    c = DatasetResult("ic15", 10, 0.5, 0.4, 0.75, ece=0.25, reliability=reliability([0.05, 0.05, 0.95, 0.95], [True, False, True, True]).to_dict())
    assert "Calibration error of the confidence (ECE, 10 bins, exact case-sensitive match): ic15 0.250" in to_markdown([c])
    single = to_markdown([DatasetResult("svt", 1000, 0.5, 0.4, 0.75)])
    assert "weighted" not in single and not single.startswith("###")

    data = to_json([a, b], tmp_path / "sub" / "r.json", {"model": "m@1"})
    on_disk = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert on_disk == data
    assert data["model"] == "m@1"
    assert data["datasets"][0] == {
        "name": "iiit5k",
        "n": 3000,
        "acc36": 0.9,
        "acc_cs": 0.8,
        "ned": 0.95,
        "worst": [{"index": 3, "label": "Hello", "prediction": "Hella", "confidence": 0.91, "file": "crops/3.png"}],
        "folder": "data/iiit5k",
        "lexicon_size": 0,
        "lexicon_n": 0,
        "acc36_lexicon": None,
        "ece": None,
        "reliability": None,
    }
    # ``one_minus_ned`` keeps the key and place "ned" has in every result file so far (docs/, weights/metrics.json).
    assert list(data["datasets"][0])[:7] == ["name", "n", "acc36", "acc_cs", "ned", "worst", "folder"]
    assert to_json([DatasetResult("svt", 1000, 0.5, 0.4, 0.75)])["datasets"][0]["worst"] == []


def test_safl_eval_cli(checkpoint: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "eval.json"
    args = ["eval", "--weights", str(checkpoint), "--data", str(folder), "--json", str(out_json), "--threads", "1", "--batch-size", "4"]
    rc = cli_main([*args, "--lexicon-size", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "### memorised@" in out and "(all)" in out
    assert "| handmade | 5 | 80.00 % | 33.33 % | 0.9500 |" in out and "acc with a 3-word lexicon |" in out
    assert json.loads(out_json.read_text())["datasets"][0]["lexicon_n"] == 5  # the 5 labels scored under the 36-char protocol
    with pytest.raises(SystemExit, match="fewer than a lexicon of 9"):
        cli_main([*args, "--lexicon-size", "9"])
    rc = cli_main(args)
    out = capsys.readouterr().out
    assert "| handmade | 5 | 80.00 % | 33.33 % | 0.9500 |\n" in out
    assert f"Most confident mistakes on handmade (in `{folder}`):" in out
    assert "- `4.png`: `Noon` → `Moon`" in out
    data = json.loads(out_json.read_text())
    assert data["model"].startswith("memorised@") and data["part"] == "all"
    (ds,) = data["datasets"]
    assert ds["name"] == "handmade" and ds["n"] == 5
    assert ds["acc36"] == pytest.approx(0.8) and ds["acc_cs"] == pytest.approx(1 / 3) and ds["ned"] == pytest.approx(0.95)
    assert ds["folder"] == str(folder) and [(w["file"], w["label"]) for w in ds["worst"]] == [("4.png", "Noon")]


def test_safl_eval_cli_validation_part(checkpoint: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["eval", "--weights", str(checkpoint), "--data", str(folder), "--part", "val", "--threads", "1", "--worst", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    val = load_folder_part(folder, PreprocessConfig(), "val")  # blocks of 1 crop in a 7-crop folder: 2 of the 7
    assert len(val) == 2
    assert "| handmade-val | " in out and "(val)" in out
    assert "Most confident mistakes" not in out


def test_paired_bootstrap_interval_brackets_the_difference() -> None:
    from model.training.compare import paired_bootstrap

    a = [True] * 60 + [False] * 40
    b = [True] * 40 + [False] * 60
    lo, hi = paired_bootstrap(a, b, rounds=500)
    assert lo < 0.2 < hi and lo > 0.0
    lo, hi = paired_bootstrap(a, a, rounds=200)
    assert lo == hi == 0.0

"""``safl recognize``'s inputs (folders, globs, ``-``, ``--stdin-image``), output formats,
progress bar, per-file errors and chunked reading, with the real tiny checkpoint."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import render_word
from service_support import encode, expected

from model import SAFL
from model.preprocess import ViewConfig
from service import recognize_cli
from service.cli import main
from service.recognize_cli import expand, folder_images, tsv_escape

ODD_NAME = "tab\there\\new\nline.png"  # a tab, a backslash and a newline in one file name


def _safl(*args: str, stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "service", *args], input=stdin, capture_output=True, timeout=120, cwd=cwd)


def _flags(checkpoint: Path) -> list[str]:
    return ["--weights", str(checkpoint), "--device", "cpu", "--threads", "1"]


@pytest.fixture
def crops(tmp_path: Path) -> Path:
    """A folder of crops: nested, mixed-case endings, a hidden folder, a non-image file."""
    root = tmp_path / "crops"
    for rel, word, fmt in [
        ("b.png", "beta", "PNG"),
        ("a.JPG", "Alpha", "JPEG"),
        ("sub/c.png", "gamma", "PNG"),
        ("sub/deeper/d.webp", "delta", "WEBP"),
        ("a-z/e.png", "eps", "PNG"),
        (".cache/x.png", "hidden", "PNG"),
        (".y.png", "hidden", "PNG"),
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(render_word(word, mode="RGB" if fmt == "JPEG" else "L"), fmt))
    (root / "notes.txt").write_text("not an image")
    return root


#: The images of ``crops`` in the order a folder is read: sorted by path components.
CROP_ORDER = ["a-z/e.png", "a.JPG", "b.png", "sub/c.png", "sub/deeper/d.webp"]


def _tsv(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines()]


def test_folder_is_searched_recursively_in_a_stable_order(crops: Path) -> None:
    assert [p.relative_to(crops).as_posix() for p in folder_images(crops)] == CROP_ORDER
    # (The fixture creates them out of this order.) A file named twice is read twice.
    got = expand([str(crops), str(crops / "b.png")])
    assert [n for n, _ in got.files] == [str(crops / r) for r in CROP_ORDER] + [str(crops / "b.png")]
    assert got.problems == []


def test_glob_patterns_are_expanded_and_sorted(crops: Path) -> None:
    got = expand([str(crops / "sub" / "**" / "*.*"), str(crops / "[ab].*"), str(crops / "none*.png")])
    assert [Path(n).relative_to(crops).as_posix() for n, _ in got.files] == ["sub/c.png", "sub/deeper/d.webp", "a.JPG", "b.png"]
    assert [(p["code"], p["filename"]) for p in got.problems] == [("no_match", str(crops / "none*.png"))]
    # A name that exists is never a pattern; one that does not and has no * ? [ is kept as a file.
    literal = crops / "[x].png"
    literal.write_bytes(b"")
    assert [n for n, _ in expand([str(literal), str(crops / "missing.png")]).files] == [str(literal), str(crops / "missing.png")]


def test_stdin_lists_paths_one_per_line(crops: Path) -> None:
    lines = f"{crops / 'b.png'}\r\n\n{crops / 'sub'}\n{crops / '*.png'}\n".encode()
    got = expand(["-"], io.BytesIO(lines))
    # CRLF and blank lines tolerated; folders searched; a line is a path, never a pattern.
    assert [n for n, _ in got.files] == [str(crops / "b.png"), str(crops / "sub/c.png"), str(crops / "sub/deeper/d.webp"), str(crops / "*.png")]


def test_tsv_escape() -> None:
    assert tsv_escape("a\tb\nc\rd\\e") == "a\\tb\\nc\\rd\\\\e"
    assert tsv_escape("plain.png") == "plain.png"


def test_recognize_a_folder_in_every_format(tiny_checkpoint: Path, tiny_model: SAFL, crops: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = crops / "sub" / ODD_NAME
    odd.write_bytes(encode(render_word("odd")))
    order = sorted([*CROP_ORDER, f"sub/{ODD_NAME}"], key=lambda r: Path(r).parts)
    want = expected(tiny_model, [(crops / r).read_bytes() for r in order], ViewConfig())

    assert main(["recognize", str(crops), *_flags(tiny_checkpoint)]) == 0
    rows = _tsv(capsys.readouterr().out)
    assert [r[0] for r in rows] == [tsv_escape(str(crops / r)) for r in order]  # one line per file, name escaped
    for (_, text, conf), ref in zip(rows, want, strict=True):
        assert text == ref.text and float(conf) == pytest.approx(ref.confidence, rel=1e-4, abs=1e-30)

    assert main(["recognize", str(crops), "--format", "csv", *_flags(tiny_checkpoint)]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["file", "text", "confidence"]
    assert [r[:2] for r in table[1:]] == [[str(crops / r), ref.text] for r, ref in zip(order, want, strict=True)]

    assert main(["recognize", str(crops), "--format", "jsonl", *_flags(tiny_checkpoint)]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["file"] for o in objs] == [str(crops / r) for r in order]
    assert set(objs[0]) == {"file", "text", "confidence", "raw_confidence", "char_confidences"}
    assert [o["text"] for o in objs] == [ref.text for ref in want]
    assert objs[0]["confidence"] == pytest.approx(want[0].confidence, rel=1e-4, abs=1e-30)

    for flags in (["--json"], ["--format", "json"]):
        assert main(["recognize", str(crops), *flags, *_flags(tiny_checkpoint)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert [r["filename"] for r in doc["results"]] == [str(crops / r) for r in order] and "errors" not in doc


def test_a_bad_file_does_not_stop_the_batch(tiny_checkpoint: Path, crops: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (crops / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    named = [str(crops / "a.JPG"), str(crops / "broken.png"), str(crops / "missing.png"), str(crops / "b.png"), str(crops / "no*.gif")]
    assert main(["recognize", *named, "--format", "jsonl", *_flags(tiny_checkpoint)]) == 1
    captured = capsys.readouterr()
    objs = [json.loads(line) for line in captured.out.splitlines()]
    # The pattern that matched nothing first, then every file in order, errors in place.
    assert [(o["file"], o.get("error", {}).get("code")) for o in objs] == [
        (named[4], "no_match"),
        (named[0], None),
        (named[1], "corrupt_image"),
        (named[2], "unreadable"),
        (named[3], None),
    ]
    err = captured.err.splitlines()
    assert len(err) == 4 and all(line.startswith("safl recognize: ") for line in err)
    assert "no*.gif" in err[0] and "broken.png" in err[1] and "missing.png" in err[2]
    assert err[3] == "safl recognize: 2 of 4 files could not be read"

    assert main(["recognize", *named, *_flags(tiny_checkpoint)]) == 1  # tsv: results only, errors on stderr
    assert [r[0] for r in _tsv(capsys.readouterr().out)] == [named[0], named[3]]


def test_files_are_read_a_chunk_at_a_time(tiny_checkpoint: Path, crops: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sizes: list[int] = []
    real = recognize_cli.read_views

    def spy(read, per_crop, confident_at):  # noqa: ANN001, ANN202
        sizes.append(len(per_crop))
        return real(read, per_crop, confident_at)

    monkeypatch.setattr(recognize_cli, "read_views", spy)
    assert main(["recognize", str(crops), "--batch-size", "1", *_flags(tiny_checkpoint)]) == 0
    assert sizes == [4, 1]  # 4 batches of 1 crop at a time
    assert len(capsys.readouterr().out.splitlines()) == len(CROP_ORDER)


def test_progress_bar(tiny_checkpoint: Path, crops: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def bar_shown(*flags: str) -> bool:
        assert main(["recognize", str(crops), *flags, *_flags(tiny_checkpoint)]) == 0
        captured = capsys.readouterr()
        assert len(captured.out.splitlines()) == len(CROP_ORDER)  # the bar never goes to stdout
        return "5/5" in captured.err

    assert bar_shown("--progress")
    assert not bar_shown()  # stderr is not a terminal here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not bar_shown()  # 5 files are too few
    monkeypatch.setattr(recognize_cli, "PROGRESS_MIN_FILES", 5)
    assert bar_shown()
    assert not bar_shown("--no-progress")


def test_cli_reads_stdin_paths_and_quoted_globs(tiny_checkpoint: Path, crops: Path) -> None:
    out = _safl("recognize", "-", *_flags(tiny_checkpoint), stdin=f"{crops / 'b.png'}\n{crops / 'sub'}\n".encode())
    assert out.returncode == 0, out.stderr
    assert [r[0] for r in _tsv(out.stdout.decode())] == [str(crops / "b.png"), str(crops / "sub/c.png"), str(crops / "sub/deeper/d.webp")]

    out = _safl("recognize", "crops/*.png", "crops/**/d.*", *_flags(tiny_checkpoint), cwd=crops.parent)  # no shell: as if quoted
    assert out.returncode == 0, out.stderr
    assert [r[0] for r in _tsv(out.stdout.decode())] == ["crops/b.png", "crops/sub/deeper/d.webp"]

    out = _safl("recognize", "--stdin-image", "--format", "jsonl", *_flags(tiny_checkpoint), stdin=(crops / "b.png").read_bytes())
    assert out.returncode == 0, out.stderr
    (obj,) = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert obj["file"] == "-" and isinstance(obj["text"], str)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nothing/*.png"], "safl recognize: no image files found in nothing/*.png"),
        (["empty"], "safl recognize: no image files found in empty"),
        ([], "safl recognize: no images given"),
        (["-", "--stdin-image"], "safl recognize: '-' (paths on standard input) and --stdin-image both read standard input"),
    ],
    ids=["glob", "empty_folder", "no_arguments", "stdin_twice"],
)
def test_nothing_to_read_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = _safl("recognize", *args, *_flags(tiny_checkpoint), cwd=tmp_path)
    err = out.stderr.decode().strip()
    assert out.returncode == 2 and out.stdout == b""
    assert len(err.splitlines()) == 1 and err.startswith(message)


def test_cli_allowlist_constrains_the_reading_and_names_a_bad_character(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    image = tmp_path / "w.png"
    render_word("ok").save(image)
    base = [sys.executable, "-m", "service", "recognize", "--weights", str(tiny_checkpoint), "--device", "cpu", str(image)]
    out = subprocess.run([*base, "--allowlist", "0123456789"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip().split("\t")[1]
    assert text and set(text) <= set("0123456789")
    bad = subprocess.run([*base, "--allowlist", "12é"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "safl recognize: allowlist has characters the model cannot read: 'é'"


def test_cli_lexicon_and_top_k(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    image = tmp_path / "w.png"
    render_word("ok").save(image)
    words = tmp_path / "words.txt"
    words.write_text("alpha\nbeta\ngamma\n", encoding="utf-8")
    base = [sys.executable, "-m", "service", "recognize", "--weights", str(tiny_checkpoint), "--device", "cpu", str(image)]
    out = subprocess.run([*base, "--lexicon", str(words), "--top-k", "3", "--format", "jsonl"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    assert line["text"] in ("alpha", "beta", "gamma")
    assert sorted(a["text"] for a in line["alternatives"]) == ["alpha", "beta", "gamma"] and line["alternatives"][0]["text"] == line["text"]
    plain = json.loads(subprocess.run([*base, "--format", "jsonl"], capture_output=True, text=True, timeout=120).stdout)
    assert "alternatives" not in plain
    missing = subprocess.run([*base, "--lexicon", str(tmp_path / "none.txt")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith(f"safl recognize: --lexicon {tmp_path / 'none.txt'}: ")
    bad = subprocess.run([*base, "--top-k", "11"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "safl recognize: top_k must be 1 to 10, got 11"

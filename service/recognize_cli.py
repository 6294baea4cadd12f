"""``safl recognize``: which files its arguments name, reading them in chunks, the output formats.

An argument is an image file, a folder (its image files, recursively), a glob pattern
(expanded here too, for shells that do not, or when quoted), or ``-``: paths on standard
input, one per line. Files are read ``CHUNK_BATCHES`` model batches at a time, so a
folder of 100k crops never sits in memory at once; each chunk's lines are written as soon
as it is read.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from model.calibration import calibrate_all
from model.reading import Recognition, read_views
from model.training.cli import view_config

if TYPE_CHECKING:
    import numpy as np

    from .local_reader import LocalReader

#: File name endings a folder is searched for (any case): the formats the service decodes.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
#: From this many files on, a progress bar is shown when standard error is a terminal.
PROGRESS_MIN_FILES = 100
#: Files read at a time, in model batches (``--batch-size``).
CHUNK_BATCHES = 4
FORMATS = ("tsv", "jsonl", "csv", "json")
STDIN = "-"
_GLOB_CHARS = frozenset("*?[")


@dataclass
class Inputs:
    """The files the arguments name, in order, and the arguments that named none."""

    #: ``(name, path)``; ``path`` is ``None`` for the image read from standard input.
    files: list[tuple[str, Path | None]] = field(default_factory=list)
    #: ``{"filename", "code", "message"}`` for a folder or pattern without image files,
    #: or a folder that could not be listed.
    problems: list[dict[str, str]] = field(default_factory=list)


def folder_images(folder: Path, problems: list[dict[str, str]] | None = None) -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``) under ``folder``, recursively, sorted by their
    path components; hidden files and folders (``.name``) are skipped, symlinked folders
    are not followed. A sub-folder that cannot be listed is added to ``problems``."""

    def unreadable(exc: OSError) -> None:
        if problems is not None:
            problems.append({"filename": str(exc.filename), "code": "unreadable", "message": f"cannot list {exc.filename}: {exc.strerror or exc}"})

    found = []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def stdin_paths(stream: IO[bytes]) -> Iterator[str]:
    """The paths on ``stream``, one per line (``\\n`` or ``\\r\\n``); empty lines are skipped.
    Bytes that are not UTF-8 are kept as the file system would (``os.fsdecode``)."""
    for raw in stream:
        line = raw.removesuffix(b"\n").removesuffix(b"\r")
        if line:
            yield os.fsdecode(line)


def expand(args: Sequence[str], stdin: IO[bytes] | None = None) -> Inputs:
    """The files named by ``args`` (see the module docstring), in argument order.

    A path that exists is taken as it is (a folder is searched); one that does not is a
    glob pattern when it holds ``* ? [`` and otherwise kept as a file, so that reading it
    reports it as missing. Lines of ``-`` are paths only: files or folders, never patterns.
    """
    out = Inputs()

    def add(name: str, from_stdin: bool = False) -> None:
        path = Path(name)
        if path.is_dir():
            known = len(out.problems)
            images = folder_images(path, out.problems)
            out.files += [(str(p), p) for p in images]
            if not images and len(out.problems) == known:  # an unlistable folder is already one line
                out.problems.append({"filename": name, "code": "no_match", "message": f"no image files in folder {name}"})
        elif not from_stdin and not path.exists() and _GLOB_CHARS & set(name):
            matches = sorted(glob.glob(name, recursive=True))
            for m in matches:
                if os.path.isdir(m):
                    out.files += [(str(p), p) for p in folder_images(Path(m), out.problems)]
                else:
                    out.files.append((m, Path(m)))
            if not matches:
                out.problems.append({"filename": name, "code": "no_match", "message": f"no files match {name!r}"})
        else:
            out.files.append((name, path))

    for arg in args:
        if arg == STDIN:
            for name in stdin_paths(stdin if stdin is not None else sys.stdin.buffer):
                add(name, from_stdin=True)
        else:
            add(arg)
    return out


def tsv_escape(text: str) -> str:
    """``text`` with backslash, tab, newline and carriage return written ``\\\\ \\t \\n \\r``."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def shown(name: str) -> str:
    """``name`` as printable UTF-8: bytes of a file name that are not UTF-8 become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _reading(r: Recognition) -> dict[str, Any]:
    # The HTTP API's result fields: alternatives only when asked for (--top-k).
    out: dict[str, Any] = {"text": r.text, "confidence": r.confidence, "raw_confidence": r.raw_confidence, "char_confidences": r.char_confidences}
    if r.alternatives:
        out["alternatives"] = [{"text": a.text, "confidence": a.confidence} for a in r.alternatives]
    return out


class Writer:
    """Writes one format to ``out``: a line per result as it comes (``json``: one document
    at ``close``). ``tsv`` and ``csv`` leave errors to standard error; ``jsonl`` and ``json``
    carry them too, in their place among the results (``json``: as the HTTP API's
    ``per_file_errors`` does, ``{"filename", "error": {"code", "message"}}``)."""

    def __init__(self, fmt: str, out: IO[str], model_id: str) -> None:
        self.fmt, self.out, self.model_id = fmt, out, model_id
        self.results: list[dict[str, Any]] = []
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(["file", "text", "confidence"])

    def result(self, name: str, r: Recognition) -> None:
        if self.fmt == "tsv":
            self.out.write(f"{shown(tsv_escape(name))}\t{r.text}\t{r.confidence:.6g}\n")
        elif self._csv is not None:
            self._csv.writerow([shown(name), r.text, f"{r.confidence:.6g}"])
        elif self.fmt == "jsonl":
            line = {"file": shown(name), **_reading(r)}
            self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        else:
            self.results.append({"filename": shown(name), **_reading(r)})

    def error(self, problem: dict[str, str]) -> None:
        problem = {**problem, "filename": shown(problem["filename"]), "message": shown(problem["message"])}
        if self.fmt == "jsonl":
            line = {"file": problem["filename"], "error": {"code": problem["code"], "message": problem["message"]}}
            self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        elif self.fmt == "json":
            self.results.append({"filename": problem["filename"], "error": {"code": problem["code"], "message": problem["message"]}})

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write(json.dumps({"model": self.model_id, "results": self.results}, ensure_ascii=False) + "\n")
        self.out.flush()


def _chunks(items: Sequence[tuple[str, Path | None]], size: int) -> Iterable[Sequence[tuple[str, Path | None]]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _load_reader(args: argparse.Namespace) -> LocalReader | None:
    """The predictor for ``args`` and its decode options; ``None`` (after one line on
    standard error) when the model or an option cannot be used."""
    from model.lexicon import read_lexicon

    from .local_reader import predictor_reader
    from .predictor import Predictor, StartupError

    try:
        predictor = Predictor.load(args.weights, args.device, args.threads, backend=args.backend, cache_dir=args.cache_dir)
    except StartupError as exc:
        print(f"safl recognize: {exc}", file=sys.stderr)
        return None
    try:
        lexicon = read_lexicon(args.lexicon) if args.lexicon is not None else None
        decode = predictor.decode_options(args.allowlist, args.blocklist, lexicon, args.top_k)
    except (OSError, ValueError) as exc:
        where = f"--lexicon {args.lexicon}: " if isinstance(exc, OSError) else ""
        print(f"safl recognize: {where}{exc}", file=sys.stderr)
        return None
    return predictor_reader(predictor, decode)


def run(args: argparse.Namespace) -> int:
    """``safl recognize``: exit 0 when every file was read, 1 when some could not be (or an
    argument named no file), 2 when nothing was named or the model cannot load."""
    from tqdm import tqdm

    from .errors import APIError
    from .images import ImageLimits, ImageRejected, load_views, treat_bomb_warning_as_error
    from .local_reader import cached_onnx_reader

    if STDIN in args.inputs and args.stdin_image:
        print("safl recognize: '-' (paths on standard input) and --stdin-image both read standard input; give one", file=sys.stderr)
        return 2
    inputs = expand(args.inputs)
    if args.stdin_image:
        inputs.files.append((STDIN, None))
    if not inputs.files:
        if not args.inputs:
            print("safl recognize: no images given: name files, folders, glob patterns, or - to read paths from standard input", file=sys.stderr)
        else:
            named = ", ".join(args.inputs[:3]) + (f" and {len(args.inputs) - 3} more" if len(args.inputs) > 3 else "")
            print(f"safl recognize: no image files found in {shown(named)}", file=sys.stderr)
        return 2
    plain = args.allowlist is None and args.blocklist is None and args.lexicon is None and not args.top_k
    reader = cached_onnx_reader(args.weights, args.device, args.backend, args.threads, args.cache_dir) if plain else None
    if reader is None:
        reader = _load_reader(args)
        if reader is None:
            return 2
    treat_bomb_warning_as_error()
    limits = ImageLimits(args.max_file_bytes, args.max_pixels)
    view_cfg = view_config(args)
    size = max(1, args.batch_size)
    total = len(inputs.files)
    show = args.progress if args.progress is not None else total >= PROGRESS_MIN_FILES and sys.stderr.isatty()
    failed = unread = 0

    def load(name: str, path: Path | None) -> list[np.ndarray]:
        if path is None:
            data = sys.stdin.buffer.read(limits.max_file_bytes + 1)
        else:
            if path.stat().st_size > limits.max_file_bytes:  # before reading it into memory
                raise ImageRejected("file_too_large", f"file {name!r} is over {limits.max_file_bytes} bytes")
            data = path.read_bytes()
        if len(data) > limits.max_file_bytes:
            raise ImageRejected("file_too_large", f"file {name!r} is over {limits.max_file_bytes} bytes")
        return load_views(data, name, limits, reader.preprocess_config, view_cfg)

    def read(views: list[np.ndarray]) -> list[Recognition]:
        return [r for i in range(0, len(views), size) for r in reader.read_batch(views[i : i + size])]

    writer = Writer(args.format, sys.stdout, reader.model_id)
    bar = tqdm(total=total, file=sys.stderr, unit="file", disable=not show, dynamic_ncols=True)

    def report(problem: dict[str, str]) -> None:
        nonlocal failed
        failed += 1
        writer.error(problem)
        sys.stdout.flush()  # the line of the file before it first, on a terminal
        tqdm.write(f"safl recognize: {shown(problem['message'])}", file=sys.stderr)

    try:
        for problem in inputs.problems:
            report(problem)
        for chunk in _chunks(inputs.files, size * CHUNK_BATCHES):
            loaded: list[tuple[str, list[np.ndarray] | dict[str, str]]] = []
            for name, path in chunk:
                try:
                    loaded.append((name, load(name, path)))
                except OSError as exc:
                    loaded.append((name, {"filename": name, "code": "unreadable", "message": f"cannot read {name}: {exc.strerror or exc}"}))
                except APIError as exc:
                    loaded.append((name, {"filename": name, "code": exc.code, "message": exc.message}))
            readings = read_views(read, [v for _, v in loaded if isinstance(v, list)], view_cfg.confident_at)
            results = iter(calibrate_all(readings, reader.calibration))
            for name, v in loaded:
                if isinstance(v, list):
                    writer.result(name, next(results))
                else:
                    unread += 1
                    report(v)
            sys.stdout.flush()
            bar.update(len(chunk))
        writer.close()
    except BrokenPipeError:  # `safl recognize big/ | head`: stop quietly
        bar.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 1
    bar.close()
    if unread and total > 1:  # after a long run the lines above may have scrolled away
        print(f"safl recognize: {unread} of {total} files could not be read", file=sys.stderr)
    return 1 if failed else 0

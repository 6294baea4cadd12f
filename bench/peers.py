"""safl side by side with the OCR recognisers a user can install offline: same crops, same metric.

One command runs every engine on the same labelled folders (``labels.tsv``: ``file<TAB>text``
per line) and prints a markdown table; ``--json``, ``--markdown`` and ``--plot`` also write it::

    python bench/peers.py --weights weights/safl.safetensors \\
        --data ../shared/data/train/iiit5k ../shared/data/train/svt ../shared/data/train/ic15 \\
        --json docs/results/peers.json --markdown docs/results/peers.md --plot docs/results/peers.png

Engines (``--peers``, default all four; one that is not installed is skipped with a message):

- ``safl``: the checkpoint through the service's code path: image bytes → PIL decode →
  ``SAFL.recognize_images`` (``model.preprocess.views``: a crop taller than wide is also read
  turned 90° each way and the most confident reading kept), at every ``--batch-sizes``.
- ``tesseract``: the Tesseract CLI (Debian ``tesseract-ocr`` + ``tesseract-ocr-eng``), one
  process per crop fed on stdin (process start-up included: that is how it is called on a
  single word), ``-l eng``, single-line (``--psm 7``) and single-word (``--psm 8``) page
  segmentation; the table shows the psm with the better overall 36-char accuracy. The
  thread budget is spent on parallel processes: ``--threads`` processes, each with
  ``OMP_THREAD_LIMIT=1``.
- ``rapidocr``: RapidOCR's PP-OCRv4 recognition model alone (PyPI ``rapidocr-onnxruntime``):
  ``RapidOCR(...)(bytes, use_det=False, use_cls=False, use_rec=True)``, the crop given as is,
  onnxruntime ``intra_op_num_threads=--threads``, ``inter_op_num_threads=1``, OpenCV
  ``setNumThreads(--threads)``; batch sizes above 1 call its recogniser
  (``engine.text_rec``) on lists of crops decoded and pre-sized the same way.
- ``rapidocr3``: the current ``rapidocr`` 3.x package (PP-OCRv6 small recogniser, in its
  wheel), recognition alone, one crop per call: what a user installs today.

Metric: ``model.training.evaluate.score``: 36-char accuracy (lowercase alphanumerics, other
characters removed; labels empty after that are not scored), case-sensitive accuracy
(whitespace removed) and 1 - NED. Accuracy is that of each engine's batch-1 run; the runs at
larger batches are checked against it (``mismatches_vs_batch1`` in the JSON).

Speed: crops/s, wall clock around each engine's whole pass over a folder, end to end from
the encoded image bytes already in memory (decode, pre-processing, inference, decoding of
the output; tesseract: process start-up too). Not timed: reading the files, model
loading, and one untimed warm-up call per engine and batch size. Every engine gets the same
thread budget (``--threads``, default 2). The engines run one after the other per folder,
so they share whatever else the machine is doing.

``--part val-unseen`` (the default) keeps the validation crops of each folder that no model of
the shipped lineage trained on (``model.training.split.unseen_val_indices``); ``--part val``
the whole validation part of the split training uses (contiguous blocks, no word on both
sides), fair for models trained on that split only.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import CheckpointError, load_checkpoint  # noqa: E402
from model.engine import open_engine  # noqa: E402
from model.onnx_reader import keep_telemetry_off  # noqa: E402
from model.preprocess import ViewConfig  # noqa: E402
from model.reading import read_images  # noqa: E402
from model.training.data import read_labels_tsv  # noqa: E402
from model.training.evaluate import as_json_dict, score  # noqa: E402
from model.training.split import DEFAULT_SPLIT, FAIR_PART, part_indices  # noqa: E402

# ONNX Runtime's telemetry off before RapidOCR loads the library, even in a run without safl
# (--peers rapidocr) or with --backend torch, where safl's ONNX engine never comes first.
keep_telemetry_off()

DEFAULT_WEIGHTS = REPO / "weights" / "safl.safetensors"
PEERS = ("safl", "tesseract", "rapidocr", "rapidocr3")

Progress = Callable[[int], None]


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here (not installed, no language data); the message says how to fix it."""


# ------------------------------------------------------------------------------------ data


@dataclass
class Folder:
    """The crops of one labelled folder (or its part), as encoded bytes, and their labels."""

    name: str
    path: Path
    files: list[str]
    labels: list[str]
    crops: list[bytes]


def load_encoded_folder(path: Path, part: str = FAIR_PART, limit: int | None = None, name: str | None = None) -> Folder:
    """``part`` (``model.training.split.part_indices``) of a ``labels.tsv`` folder, the first
    ``limit`` crops of it, as the files' encoded bytes: every peer decodes them itself
    (``model.training.data.load_folder`` gives pre-processed arrays instead). Raises
    ``ValueError`` for an unknown ``part`` or a malformed ``labels.tsv``,
    ``FileNotFoundError`` without ``labels.tsv`` or for a file it names that is missing."""
    pairs = read_labels_tsv(path)
    idx = part_indices([t for _, t in pairs], part)
    if limit is not None:
        idx = idx[:limit]
    files = [pairs[i][0] for i in idx]
    return Folder(name or path.name, path, files, [pairs[i][1] for i in idx], [(path / f).read_bytes() for f in files])


# ------------------------------------------------------------------------------------ peers


@dataclass
class Variant:
    """One way of running a peer: a configuration at one batch size."""

    config: str  # "default", "psm 7", ...
    batch_size: int
    run: Callable[[list[bytes], Progress], list[str]]

    @property
    def label(self) -> str:
        return f"{self.config}, batch {self.batch_size}" if self.config != "default" else f"batch {self.batch_size}"


class Peer:
    """An OCR engine under test. ``load`` raises ``PeerUnavailable``; ``info`` describes the setup."""

    name = ""

    def load(self) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        raise NotImplementedError

    def variants(self) -> list[Variant]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``load`` started."""


def decode_image(data: bytes) -> Image.Image:
    """The image of an encoded file, fully decoded; raises PIL's ``UnidentifiedImageError``
    for bytes it cannot read. As the service: PIL opens and decodes, ``model.preprocess``
    does the rest."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


class SaflPeer(Peer):
    """The checkpoint, through the service's code path (decode → views → collate → recognize → most confident view)."""

    name = "safl"

    def __init__(self, weights: Path, batch_sizes: list[int], threads: int, backend: str = "auto") -> None:
        self.weights, self.batch_sizes, self.threads, self.backend = Path(weights), batch_sizes, threads, backend

    def load(self) -> None:
        if not self.weights.exists():
            raise PeerUnavailable(f"weights not found at {self.weights}; pass --weights PATH (a checkpoint written by `safl train`)")
        torch.set_num_threads(self.threads)
        self.model, self.ckpt = load_checkpoint(self.weights, device="cpu")
        self.cfg = self.ckpt.config.preprocess
        # The service's engine choice (model.engine): ONNX Runtime on the CPU by default.
        self.reader = open_engine(self.model, self.ckpt.model_id, self.backend, "cpu", self.threads)
        self.engine = self.reader.name

    def info(self) -> dict[str, Any]:
        c = self.ckpt.config
        return {
            "engine": f"safl {c.preset} ({self.model.num_parameters() / 1e6:.1f} M parameters)",
            "model_id": self.ckpt.model_id,
            "weights": str(self.weights),
            "preset": c.preset,
            "input": f"{self.cfg.height}x{self.cfg.width}x{self.cfg.channels}",
            "torch": torch.__version__,
            "device": "cpu",
            "backend": self.engine,
            "threads": f"torch.set_num_threads({torch.get_num_threads()})"
            + (f", onnxruntime intra_op_num_threads={self.threads}" if self.engine == "onnx" else ""),
            "call": f"PIL.Image.open(bytes) -> recognize_images on {self.engine} (model.preprocess.views, most confident view; float32)",
        }

    def _runner(self, batch_size: int) -> Callable[[list[bytes], Progress], list[str]]:
        def run(crops: list[bytes], progress: Progress) -> list[str]:
            texts: list[str] = []
            for i in range(0, len(crops), batch_size):
                chunk = crops[i : i + batch_size]
                texts += [r.text for r in read_images(self.reader.recognize, [decode_image(c) for c in chunk], self.cfg, ViewConfig(), torch.device("cpu"))]
                progress(len(chunk))
            return texts

        return run

    def variants(self) -> list[Variant]:
        return [Variant("default", b, self._runner(b)) for b in self.batch_sizes]


class TesseractPeer(Peer):
    """The tesseract CLI, one process per crop (image on stdin), ``threads`` processes at a time."""

    name = "tesseract"

    def __init__(self, threads: int, psms: tuple[int, ...] = (7, 8), lang: str = "eng") -> None:
        self.jobs, self.psms, self.lang = threads, psms, lang
        self.errors: dict[int, int] = {p: 0 for p in psms}
        self.lock = threading.Lock()
        self.last_error = ""

    def load(self) -> None:
        exe = shutil.which("tesseract")
        if exe is None:
            raise PeerUnavailable("the tesseract command is not on PATH (Debian/Ubuntu: apt-get install tesseract-ocr tesseract-ocr-eng)")
        self.exe = exe
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
        self.version = (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "tesseract (unknown version)"
        langs = subprocess.run([exe, "--list-langs"], capture_output=True, text=True, check=False)
        if self.lang not in (langs.stdout + langs.stderr).split():
            raise PeerUnavailable(f"tesseract has no {self.lang!r} language data (apt-get install tesseract-ocr-{self.lang})")
        # The thread budget goes to parallel processes, each single-threaded: OpenMP inside
        # one process on one small word only adds overhead.
        self.env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        self.pool = ThreadPoolExecutor(max_workers=self.jobs)

    def close(self) -> None:
        if hasattr(self, "pool"):
            self.pool.shutdown()

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.version,
            "command": f"tesseract stdin stdout -l {self.lang} --psm {{{'|'.join(map(str, self.psms))}}}",
            "threads": f"{self.jobs} processes in parallel, OMP_THREAD_LIMIT=1 each",
            "call": "one process per crop, encoded image on stdin (process start-up timed)",
            "errors": {f"psm {p}": n for p, n in self.errors.items()},
            "last_error": self.last_error,
        }

    def _one(self, data: bytes, psm: int) -> str:
        cmd = [self.exe, "stdin", "stdout", "-l", self.lang, "--psm", str(psm)]
        p = subprocess.run(cmd, input=data, capture_output=True, env=self.env, timeout=120, check=False)
        if p.returncode != 0:
            with self.lock:
                self.errors[psm] += 1
            self.last_error = p.stderr.decode("utf-8", "replace").strip()[-300:]
            return ""
        return " ".join(p.stdout.decode("utf-8", "replace").split())

    def _runner(self, psm: int) -> Callable[[list[bytes], Progress], list[str]]:
        def run(crops: list[bytes], progress: Progress) -> list[str]:
            futures = [self.pool.submit(self._one, c, psm) for c in crops]
            texts = []
            for f in futures:
                texts.append(f.result())
                progress(1)
            return texts

        return run

    def variants(self) -> list[Variant]:
        return [Variant(f"psm {p}", 1, self._runner(p)) for p in self.psms]


class RapidOCRPeer(Peer):
    """RapidOCR's recognition model alone: detection and angle classifier off, the crop as is."""

    name = "rapidocr"

    def __init__(self, batch_sizes: list[int], threads: int) -> None:
        self.batch_sizes, self.threads = batch_sizes, threads

    def load(self) -> None:
        try:
            import cv2
            import rapidocr_onnxruntime
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise PeerUnavailable(f"rapidocr-onnxruntime is not installed ({exc}); pip install -r bench/requirements.txt") from None
        cv2.setNumThreads(self.threads)
        self.engine = RapidOCR(intra_op_num_threads=self.threads, inter_op_num_threads=1)
        try:
            from importlib.metadata import version

            self.version = version("rapidocr-onnxruntime")
        except Exception:  # noqa: BLE001 - only for the report
            self.version = getattr(rapidocr_onnxruntime, "__version__", "?")
        import onnxruntime

        self.ort_version = onnxruntime.__version__
        self.cv2_version = cv2.__version__

    def info(self) -> dict[str, Any]:
        rec = self.engine.text_rec
        sess = getattr(getattr(rec, "session", None), "session", None)
        model = Path(sess._model_path).name if sess is not None and getattr(sess, "_model_path", None) else "?"
        opts = sess.get_session_options() if sess is not None else None
        threads = (
            f"onnxruntime intra_op_num_threads={opts.intra_op_num_threads}, inter_op_num_threads={opts.inter_op_num_threads}; cv2.setNumThreads({self.threads})"
            if opts is not None
            else f"intra_op_num_threads={self.threads} requested"
        )
        return {
            "engine": f"rapidocr-onnxruntime {self.version} (onnxruntime {self.ort_version}, opencv {self.cv2_version})",
            "model": model,
            "rec_img_shape": list(getattr(rec, "rec_image_shape", [])),
            "threads": threads,
            "call": "RapidOCR()(bytes, use_det=False, use_cls=False, use_rec=True); batch > 1: engine.text_rec(list of crops)",
        }

    def _runner(self, batch_size: int) -> Callable[[list[bytes], Progress], list[str]]:
        engine = self.engine

        def run_single(crops: list[bytes], progress: Progress) -> list[str]:
            texts = []
            for c in crops:
                res, _ = engine(c, use_det=False, use_cls=False, use_rec=True)
                texts.append(res[0][0] if res else "")
                progress(1)
            return texts

        def run_batched(crops: list[bytes], progress: Progress) -> list[str]:
            # What engine(...) does with det and cls off, for several crops at once.
            engine.text_rec.rec_batch_num = batch_size
            texts: list[str] = []
            for i in range(0, len(crops), batch_size):
                chunk = crops[i : i + batch_size]
                imgs = [engine.preprocess(engine.load_img(c))[0] for c in chunk]
                res, _ = engine.text_rec(imgs)
                texts += [r[0] for r in res]
                progress(len(chunk))
            return texts

        return run_single if batch_size == 1 else run_batched

    def variants(self) -> list[Variant]:
        sizes = list(self.batch_sizes)
        # Batching needs the engine's internals (1.3/1.4 layout); without them only per-crop calls.
        if not all(hasattr(self.engine, a) for a in ("preprocess", "load_img", "text_rec")):
            sizes = [1]
        return [Variant("default", b, self._runner(b)) for b in sizes]


class RapidOCR3Peer(Peer):
    """The current ``rapidocr`` 3.x package (PP-OCRv6 small recogniser, shipped in its wheel):
    what a user installs today. Recognition alone, the crop as is, one crop per call."""

    name = "rapidocr3"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def load(self) -> None:
        try:
            import cv2
            from rapidocr import RapidOCR
        except ImportError as exc:
            raise PeerUnavailable(f"rapidocr 3.x is not installed ({exc}); pip install -r bench/requirements.txt") from None
        cv2.setNumThreads(self.threads)
        self.engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "EngineConfig.onnxruntime.intra_op_num_threads": self.threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )
        from importlib.metadata import version

        self.version = version("rapidocr")

    def info(self) -> dict[str, Any]:
        return {
            "engine": f"rapidocr {self.version}",
            "model": "PP-OCRv6_rec_small.onnx (the package default)",
            "threads": f"onnxruntime intra_op_num_threads={self.threads}, inter_op_num_threads=1; cv2.setNumThreads({self.threads})",
            "call": "RapidOCR()(bytes, use_det=False, use_cls=False, use_rec=True).txts[0]",
        }

    def _run(self, crops: list[bytes], progress: Progress) -> list[str]:
        texts = []
        for c in crops:
            out = self.engine(c, use_det=False, use_cls=False, use_rec=True)
            txts = getattr(out, "txts", None) or ("",)
            texts.append(txts[0])
            progress(1)
        return texts

    def variants(self) -> list[Variant]:
        return [Variant("default", 1, self._run)]


# ------------------------------------------------------------------------------------ run


@dataclass
class Metrics:
    n: int  # samples scored under the 36-char protocol
    crops: int
    acc36: float
    acc_cs: float
    one_minus_ned: float  # 1 − NED; JSON key "ned" (model.training.evaluate.as_json_dict)
    seconds: float
    crops_per_s: float
    mismatches_vs_batch1: int | None = None


@dataclass
class VariantResult:
    config: str
    batch_size: int
    datasets: dict[str, Metrics] = field(default_factory=dict)
    predictions: dict[str, list[str]] = field(default_factory=dict)

    def overall(self) -> Metrics:
        ms = list(self.datasets.values())
        n, crops, secs = sum(m.n for m in ms), sum(m.crops for m in ms), sum(m.seconds for m in ms)
        w = lambda a: sum(getattr(m, a) * m.n for m in ms) / max(n, 1)  # noqa: E731
        mism = [m.mismatches_vs_batch1 for m in ms if m.mismatches_vs_batch1 is not None]
        return Metrics(n, crops, w("acc36"), w("acc_cs"), w("one_minus_ned"), secs, crops / secs if secs > 0 else 0.0, sum(mism) if mism else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "batch_size": self.batch_size,
            "datasets": {k: as_json_dict(m) for k, m in self.datasets.items()},
            "all": as_json_dict(self.overall()),
        }


def run_benchmark(folders: list[Folder], peers: list[Peer], progress: bool = True) -> dict[str, list[VariantResult]]:
    """Every variant of every peer on every folder; folder by folder so the peers share machine conditions."""
    plan = [(p, v) for p in peers for v in p.variants()]
    results: dict[str, list[VariantResult]] = {p.name: [] for p in peers}
    by_variant: dict[int, VariantResult] = {}
    for p, v in plan:
        vr = VariantResult(v.config, v.batch_size)
        results[p.name].append(vr)
        by_variant[id(v)] = vr
    total = sum(len(f.crops) for f in folders) * len(plan)
    bar = tqdm(total=total, unit="crop", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        warmed: set[int] = set()
        for folder in folders:
            for p, v in plan:
                bar.set_description(f"{folder.name}: {p.name} {v.label}")
                if id(v) not in warmed and folder.crops:
                    v.run(folder.crops[: max(v.batch_size, 2)], lambda k: None)  # untimed warm-up
                    warmed.add(id(v))
                t0 = time.perf_counter()
                texts = v.run(folder.crops, bar.update)
                secs = time.perf_counter() - t0
                n, acc36, acc_cs, one_minus_ned = score(texts, folder.labels)
                vr = by_variant[id(v)]
                vr.predictions[folder.name] = texts
                vr.datasets[folder.name] = Metrics(n, len(texts), acc36, acc_cs, one_minus_ned, secs, len(texts) / secs if secs > 0 else 0.0)
    finally:
        bar.close()
    # Larger batches must read the same as batch 1: count where they do not.
    for variants in results.values():
        for vr in variants:
            ref = next((r for r in variants if r.config == vr.config and r.batch_size == 1), None)
            if ref is None or ref is vr:
                continue
            for name, m in vr.datasets.items():
                m.mismatches_vs_batch1 = sum(a != b for a, b in zip(vr.predictions[name], ref.predictions[name]))
    return results


def summarize(name: str, variants: list[VariantResult]) -> dict[str, Any]:
    """The configuration shown (best overall 36-char accuracy at batch 1), its batch-1 and best-batch speed."""
    b1 = [v for v in variants if v.batch_size == 1] or variants
    chosen = max(b1, key=lambda v: v.overall().acc36)  # first wins a tie
    same = [v for v in variants if v.config == chosen.config]
    fastest = max(same, key=lambda v: v.overall().crops_per_s)
    return {
        "config": chosen.config,
        "accuracy_from": f"{chosen.config}, batch {chosen.batch_size}",
        "batch1": chosen.to_dict(),
        "best_batch_size": fastest.batch_size,
        "best": fastest.to_dict(),
        "configs_compared": {v.config: v.overall().acc36 for v in b1} if len(b1) > 1 else None,
    }


def goals(summary: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The issue's goals, as ratios of this run: safl vs RapidOCR on accuracy per folder and on speed."""
    if "safl" not in summary or "rapidocr" not in summary:
        return {"evaluated": False, "reason": "needs both safl and rapidocr in the run"}
    s, r = summary["safl"], summary["rapidocr"]
    per = {}
    for name in names:
        a, b = s["batch1"]["datasets"][name]["acc36"], r["batch1"]["datasets"][name]["acc36"]
        per[name] = {"safl": a, "rapidocr": b, "ratio": a / b if b > 0 else None, "met": a >= b}
    s_best = s["best"]["all"]["crops_per_s"]
    r_b1, r_best = r["batch1"]["all"]["crops_per_s"], r["best"]["all"]["crops_per_s"]
    return {
        "evaluated": True,
        "accuracy_36_every_folder": {"met": all(v["met"] for v in per.values()), "per_dataset": per},
        "speed": {
            "safl_best_batch_size": s["best_batch_size"],
            "safl_crops_per_s": s_best,
            "rapidocr_per_crop_crops_per_s": r_b1,
            "rapidocr_best_batch_size": r["best_batch_size"],
            "rapidocr_best_crops_per_s": r_best,
            "ratio_vs_rapidocr_per_crop": s_best / r_b1 if r_b1 > 0 else None,
            "ratio_vs_rapidocr_best": s_best / r_best if r_best > 0 else None,
            "met_vs_per_crop": s_best >= r_b1,
            "met_vs_best": s_best >= r_best,
        },
    }


# ------------------------------------------------------------------------------------ output


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _speed_cell(s: dict[str, Any] | None, key: str) -> str:
    if s is None:
        return "—"
    b1 = s["batch1"]["datasets"][key]["crops_per_s"] if key != "all" else s["batch1"]["all"]["crops_per_s"]
    if s["best_batch_size"] == 1:
        return f"{b1:.1f}"
    best = s["best"]["datasets"][key]["crops_per_s"] if key != "all" else s["best"]["all"]["crops_per_s"]
    return f"b1 {b1:.1f} · b{s['best_batch_size']} {best:.1f}"


def _pick(s: dict[str, Any] | None, key: str, metric: str) -> float | None:
    if s is None:
        return None
    return s["batch1"]["all"][metric] if key == "all" else s["batch1"]["datasets"][key][metric]


def to_markdown(report: dict[str, Any]) -> str:
    """The report's tables and goals in markdown."""
    names = [d["name"] for d in report["datasets"]]
    summ: dict[str, dict[str, Any]] = report["summary"]
    peers = [p for p in PEERS if p in report["peers_requested"]]
    head = {p: p + (f" ({summ[p]['config']})" if p in summ and summ[p]["config"] != "default" else "") for p in peers}
    n_of = {d["name"]: d["n36"] for d in report["datasets"]}
    rows = [*names, "all"] if len(names) > 1 else names
    lines = [
        f"## safl vs peers: {report['part']} part of each folder" + (f", first {report['limit']} crops" if report["limit"] else ""),
        "",
        f"{report['machine']['summary']}; every engine limited to {report['threads']} threads; run {report['created']}"
        + (f", load average {report['machine']['load_average_at_start'][0]:.1f} at the start" if report["machine"].get("load_average_at_start") else "")
        + ".",
        "",
        (
            "Word accuracy under the 36-char protocol (lowercase alphanumerics); speed in crops/s end to end "
            "from encoded image bytes (b1: one crop per call, bN: N crops per call); "
            "n: crops whose label keeps at least one character under the 36-char protocol."
        ),
        "",
        "| dataset | n | " + " | ".join(head[p] for p in peers) + " | " + " | ".join(f"{p} crops/s" for p in peers) + " |",
        "|---|---:|" + "---:|" * (2 * len(peers)),
    ]
    for key in rows:
        n = sum(n_of.values()) if key == "all" else n_of[key]
        label = "**all (weighted)**" if key == "all" else key
        acc = [_pct(_pick(summ.get(p), key, "acc36")) for p in peers]
        spd = [_speed_cell(summ.get(p), key) for p in peers]
        lines.append(f"| {label} | {n} | " + " | ".join(acc) + " | " + " | ".join(spd) + " |")
    lines += [
        "",
        "Case-sensitive accuracy (whitespace removed, punctuation kept) and 1 − NED (36-char strings):",
        "",
        "| dataset | " + " | ".join(f"{p} case-sens." for p in peers) + " | " + " | ".join(f"{p} 1−NED" for p in peers) + " |",
        "|---|" + "---:|" * (2 * len(peers)),
    ]
    for key in rows:
        label = "**all (weighted)**" if key == "all" else key
        cs = [_pct(_pick(summ.get(p), key, "acc_cs")) for p in peers]
        one_minus_ned = ["—" if _pick(summ.get(p), key, "ned") is None else f"{_pick(summ.get(p), key, 'ned'):.3f}" for p in peers]
        lines.append(f"| {label} | " + " | ".join(cs) + " | " + " | ".join(one_minus_ned) + " |")

    g = report["goals"]
    lines += ["", "Goals (ratios in this run):", ""]
    if g.get("evaluated"):
        acc = g["accuracy_36_every_folder"]
        per = ", ".join(
            f"{k} {100 * v['safl']:.1f} vs {100 * v['rapidocr']:.1f} %" + (f" ({v['ratio']:.2f}×)" if v["ratio"] is not None else "")
            for k, v in acc["per_dataset"].items()
        )
        sp = g["speed"]
        ratio = lambda x: "—" if x is None else f"{x:.2f}×"  # noqa: E731
        lines += [
            f"- safl 36-char accuracy ≥ RapidOCR's on every folder: **{'met' if acc['met'] else 'not met'}** ({per}).",
            (
                f"- safl crops/s at its best batch size (b{sp['safl_best_batch_size']}, {sp['safl_crops_per_s']:.1f}/s) ≥ RapidOCR's: "
                f"**{'met' if sp['met_vs_per_crop'] else 'not met'}** against RapidOCR per crop "
                f"({sp['rapidocr_per_crop_crops_per_s']:.1f}/s, {ratio(sp['ratio_vs_rapidocr_per_crop'])}); "
                f"**{'met' if sp['met_vs_best'] else 'not met'}** against RapidOCR at its best batch size "
                f"(b{sp['rapidocr_best_batch_size']}, {sp['rapidocr_best_crops_per_s']:.1f}/s, {ratio(sp['ratio_vs_rapidocr_best'])})."
            ),
        ]
    else:
        lines.append(f"- not evaluated: {g.get('reason')}")

    lines += ["", "Engines:", ""]
    for p in peers:
        if p in report["skipped"]:
            lines.append(f"- **{p}**: skipped: {report['skipped'][p]}")
            continue
        info = report["engines"][p]
        extra = ""
        if p == "tesseract" and summ[p].get("configs_compared"):
            cmp_ = ", ".join(f"{k}: {_pct(v)}" for k, v in summ[p]["configs_compared"].items())
            extra = f"; {summ[p]['config']} shown, the better overall 36-char accuracy ({cmp_})"
            if any(info.get("errors", {}).values()):
                extra += f"; non-zero exits: {info['errors']}"
        if p == "safl":
            extra = f"; model {info['model_id']}, input {info['input']}"
        if p == "rapidocr":
            extra = f"; model {info['model']}"
        lines.append(f"- **{p}**: {info['engine']}; {info['call']}; threads: {info['threads']}{extra}.")
    bs = report.get("batch_sizes")
    lines += [
        "",
        f"Timed: each engine's pass over a folder, from the encoded bytes in memory to the text (batch sizes tried: {bs}). "
        "Not timed: file reads, model loading, one warm-up call per engine and batch size. " + _mismatch_text(report),
    ]
    return "\n".join(lines) + "\n"


def _mismatch_text(report: dict[str, Any]) -> str:
    parts = []
    for name, variants in report["variants"].items():
        counts = [f"b{v['batch_size']} {v['all']['mismatches_vs_batch1']}" for v in variants if v["all"].get("mismatches_vs_batch1") is not None]
        if counts:
            parts.append(f"{name} {', '.join(counts)}")
    return f"Predictions that differ from batch 1 at larger batches: {'; '.join(parts)}." if parts else ""


def write_predictions(path: Path, folders: list[Folder], results: dict[str, list[VariantResult]], summary: dict[str, Any]) -> None:
    """``dataset, file, label`` and each engine's batch-1 reading (the configuration shown), one crop per line."""
    cols = {}
    for name, variants in results.items():
        vr = next(v for v in variants if v.config == summary[name]["config"] and v.batch_size == 1)
        cols[name] = vr.predictions
    clean = lambda t: t.replace("\t", " ").replace("\n", " ")  # noqa: E731
    lines = ["\t".join(["dataset", "file", "label", *cols])]
    for f in folders:
        for i, (file, label) in enumerate(zip(f.files, f.labels)):
            lines.append("\t".join([f.name, file, clean(label), *(clean(c[f.name][i]) for c in cols.values())]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    summary = f"{cpu}, {usable} usable cores, Python {platform.python_version()}, torch {torch.__version__}"
    return {
        "cpu": cpu,
        "usable_cores": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load,
        "summary": summary,
    }


def _load_plots() -> Any:
    spec = importlib.util.spec_from_file_location("safl_bench_peer_plots", Path(__file__).with_name("peer_plots.py"))
    assert spec is not None and spec.loader is not None
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def build_peers(names: list[str], weights: Path, batch_sizes: list[int], threads: int, safl_backend: str = "auto") -> list[Peer]:
    out: list[Peer] = []
    for n in names:
        if n == "safl":
            out.append(SaflPeer(weights, batch_sizes, threads, safl_backend))
        elif n == "tesseract":
            out.append(TesseractPeer(threads))
        elif n == "rapidocr":
            out.append(RapidOCRPeer(batch_sizes, threads))
        elif n == "rapidocr3":
            out.append(RapidOCR3Peer(threads))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help=f"safl checkpoint (default: {DEFAULT_WEIGHTS.relative_to(REPO)})")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="labelled folders (labels.tsv: file<TAB>text per line)")
    p.add_argument(
        "--part",
        choices=["val-unseen", "val", "train", "all"],
        default=FAIR_PART,
        help="val-unseen (default): the validation crops no model of the shipped lineage trained on; val: the "
        "validation part (model.training.split); all: every crop",
    )
    p.add_argument("--limit", type=int, help="at most N crops per folder (the first N of the part)")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="engines to run (default: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64], help="batch sizes for safl and rapidocr (default: 1 8 32 64)")
    p.add_argument("--threads", type=int, default=2, help="thread budget of every engine (default: 2)")
    p.add_argument(
        "--safl-backend",
        choices=("auto", "onnx", "torch"),
        default="auto",
        help="safl's inference engine, as `safl serve --backend` (default: auto, onnx on the CPU)",
    )
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    p.add_argument("--plot", type=Path, help="write a PNG here (needs matplotlib)")
    p.add_argument("--predictions", type=Path, help="write every crop's label and each engine's reading here (TSV)")
    p.add_argument("--service-load", type=Path, help="JSON of `bench/service_load.py --json`: adds latency vs load to --plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if any(b < 1 for b in args.batch_sizes) or args.threads < 1:
        p.error("batch sizes and --threads must be at least 1")
    batch_sizes = sorted(set(args.batch_sizes) | {1})  # batch 1 always: accuracy and the per-crop speed come from it
    if args.service_load and not args.plot:
        p.error("--service-load only feeds --plot; give --plot too")

    folders, seen = [], set()
    for path in args.data:
        name = path.name if path.name not in seen else f"{path.parent.name}/{path.name}"
        seen.add(name)
        try:
            folders.append(load_encoded_folder(path, args.part, args.limit, name))
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    threads_before = torch.get_num_threads()
    peers, skipped = [], {}
    for peer in build_peers(list(dict.fromkeys(args.peers)), args.weights, batch_sizes, args.threads, args.safl_backend):
        try:
            peer.load()
            peers.append(peer)
        except (PeerUnavailable, CheckpointError) as exc:
            if peer.name == "safl":  # the subject of the benchmark: no silent skip
                print(f"error: safl: {exc}", file=sys.stderr)
                return 2
            skipped[peer.name] = str(exc)
            print(f"{peer.name}: skipped: {exc}", file=sys.stderr)
    if not peers:
        print("error: no engine could run", file=sys.stderr)
        return 2
    try:
        results = run_benchmark(folders, peers, progress=not args.no_progress)
    finally:
        for peer in peers:
            peer.close()
        torch.set_num_threads(threads_before)
    summary = {name: summarize(name, vs) for name, vs in results.items()}
    names = [f.name for f in folders]
    n36 = {name: next(iter(summary.values()))["batch1"]["datasets"][name]["n"] for name in names}
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "part": args.part,
        "split": asdict(DEFAULT_SPLIT) if args.part != "all" else None,
        "limit": args.limit,
        "threads": args.threads,
        "batch_sizes": batch_sizes,
        "machine": machine_info(),
        "datasets": [{"name": f.name, "path": str(f.path), "crops": len(f.crops), "n36": n36[f.name]} for f in folders],
        "peers_requested": list(dict.fromkeys(args.peers)),
        "skipped": skipped,
        "engines": {peer.name: peer.info() for peer in peers},
        "summary": summary,
        "goals": goals(summary, names),
        "variants": {name: [v.to_dict() for v in vs] for name, vs in results.items()},
        "timing": "wall clock per engine pass over a folder, from encoded bytes in memory to text; "
        "file reads, model loading and one warm-up call per engine and batch size excluded",
    }
    md = to_markdown(report)
    print(md)
    if args.predictions:
        write_predictions(args.predictions, folders, results, summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    if args.plot:
        load = json.loads(args.service_load.read_text()) if args.service_load else None
        try:
            _load_plots().make_figure(report, load, args.plot)
        except ImportError as exc:
            print(f"error: --plot needs matplotlib ({exc}); pip install -r bench/requirements.txt", file=sys.stderr)
            return 2
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

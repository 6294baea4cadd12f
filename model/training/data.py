"""Datasets for training and evaluation, all held as uint8 arrays in memory.

Every source (rendered shards, a ``labels.tsv`` folder of real crops, an LMDB in the
STR layout) is turned into an ``ArrayDataset``: the output of
``model.preprocess.resize`` for each image plus its label. Batches are then cheap
index gathers, so data loading stays a small share of a CPU training step.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..charset import Charset
from ..preprocess import PreprocessConfig, ViewConfig, resize, views
from .split import DEFAULT_SPLIT, SplitConfig, check_part, part_indices


@dataclass
class ArrayDataset:
    """Pre-processed images (uint8 ``[N, H, W]`` or ``[N, H, W, 3]``) and their labels."""

    name: str
    images: np.ndarray
    labels: list[str]
    #: The further views (``model.preprocess.views``) of the samples read in more than
    #: one, index → uint8 ``[V, H, W(, 3)]``: evaluation keeps the most confident
    #: reading, as the service does; training reads ``images`` only.
    extra_views: dict[int, np.ndarray] = field(default_factory=dict)
    #: Where each sample came from, for listings of mistakes: its path relative to
    #: ``folder`` as ``labels.tsv`` names it (an LMDB: its ``image-%09d`` key); empty
    #: when not known (rendered shards).
    sources: list[str] = field(default_factory=list)
    #: The labelled folder (or LMDB) the samples were read from, as given; "" if none.
    folder: str = ""
    #: Where each crop's text edges lie (float16 ``[N, F, 2]``, normalised: the rectifier's
    #: point targets, ``synth.Renderer.render_with_points``), or None: only rendered shards
    #: of renderer 4 and later carry them.
    points: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def filtered(self, charset: Charset, max_len: int) -> ArrayDataset:
        """Only the samples whose label is trainable (spaces dropped, in-charset, short enough)."""
        keep, labels = [], []
        for i, lab in enumerate(self.labels):
            ok = charset.filter_label(lab, max_len)
            if ok is not None:
                keep.append(i)
                labels.append(ok)
        if len(keep) == len(self.labels) and labels == self.labels:
            return self  # nothing dropped: avoid copying a large image array
        idx = np.asarray(keep, dtype=np.int64)
        return ArrayDataset(self.name, self.images[idx], labels, self._views_at(keep), self._sources_at(keep), self.folder, self._points_at(idx))

    def subset(self, indices: list[int], name: str | None = None) -> ArrayDataset:
        """The samples at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(
            name or self.name,
            self.images[idx],
            [self.labels[i] for i in indices],
            self._views_at(indices),
            self._sources_at(indices),
            self.folder,
            self._points_at(idx),
        )

    def _views_at(self, indices: list[int]) -> dict[int, np.ndarray]:
        return {new: self.extra_views[old] for new, old in enumerate(indices) if old in self.extra_views}

    def _points_at(self, idx: np.ndarray) -> np.ndarray | None:
        return None if self.points is None else self.points[idx]

    def _sources_at(self, indices: list[int]) -> list[str]:
        return [self.sources[i] for i in indices] if self.sources else []


def read_labels_tsv(folder: Path) -> list[tuple[str, str]]:
    """``(file, text)`` pairs of ``folder/labels.tsv`` (``file<TAB>text`` per line)."""
    path = folder / "labels.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no labels.tsv (expected lines 'file<TAB>text')")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, text = line.partition("\t")
        if not sep:
            hint = next((f" (found a {name}: the separator is a tab)" for ch, name in ((",", "comma"), (";", "semicolon"), (" ", "space")) if ch in line), "")
            raise ValueError(f"{path}:{n}: expected 'file<TAB>text'{hint}")
        pairs.append((name, text))
    return pairs


def load_folder(folder: str | Path, cfg: PreprocessConfig, name: str | None = None, view_cfg: ViewConfig | None = ViewConfig()) -> ArrayDataset:
    """A ``labels.tsv`` folder of image files, pre-processed with the shared code path.

    With ``view_cfg`` each sample also carries the further views the service would read
    (``extra_views``); training passes ``None``: it reads the crops as they are.
    """
    folder = Path(folder)
    pairs = read_labels_tsv(folder)
    per_image = []
    for n, (f, _) in enumerate(pairs, 1):
        try:
            per_image.append(_load_views(folder / f, cfg, view_cfg))
        except FileNotFoundError:
            header = " (a header line? labels.tsv has none)" if n == 1 else ""
            raise FileNotFoundError(f"{folder / 'labels.tsv'}:{n} names {f!r}, which is not in {folder}{header}") from None
    return _from_views(name or folder.name, per_image, [t for _, t in pairs], cfg, [f for f, _ in pairs], str(folder))


def _load_views(path: Path, cfg: PreprocessConfig, view_cfg: ViewConfig | None) -> list[np.ndarray]:
    with Image.open(path) as im:
        return _views(im, cfg, view_cfg)


def _views(img: Image.Image, cfg: PreprocessConfig, view_cfg: ViewConfig | None) -> list[np.ndarray]:
    return [resize(img, cfg)] if view_cfg is None else views(img, cfg, view_cfg)


def _from_views(
    name: str, per_image: list[list[np.ndarray]], labels: list[str], cfg: PreprocessConfig, sources: list[str] | None = None, folder: str = ""
) -> ArrayDataset:
    if not per_image:
        shape = (0, cfg.height, cfg.width) + ((3,) if cfg.channels == 3 else ())
        return ArrayDataset(name, np.zeros(shape, np.uint8), labels, sources=sources or [], folder=folder)
    extra = {i: np.stack(v[1:]) for i, v in enumerate(per_image) if len(v) > 1}
    return ArrayDataset(name, np.stack([v[0] for v in per_image]), labels, extra, sources or [], folder)


def load_folder_part(
    folder: str | Path, cfg: PreprocessConfig, part: str, split: SplitConfig = DEFAULT_SPLIT, view_cfg: ViewConfig | None = ViewConfig()
) -> ArrayDataset:
    """``part`` (``model.training.split.part_indices``) of a labelled folder: ``"val"``,
    ``"train"`` (the fine-tune part), ``"all"``, or ``"val-unseen"`` (the validation crops
    no model of the legacy lineage trained on, ``model.training.split.unseen_val_indices``).

    The split (``model.training.split``) keeps scenes and words apart, so the validation
    part is never trained on, not even as another crop of the same word.

    Raises ``ValueError`` for an unknown ``part``, ``FileNotFoundError`` without ``labels.tsv``.
    """
    check_part(part)  # before reading the whole folder
    ds = load_folder(folder, cfg, view_cfg=view_cfg)
    if part == "all":
        return ds
    return ds.subset(part_indices(ds.labels, part, split), f"{ds.name}-{part}")


def load_shards(folder: str | Path, limit: int | None = None) -> ArrayDataset:
    """Rendered ``shard-*.npy`` + ``shard-*.txt`` files (see ``model.training.synth``)."""
    folder = Path(folder)
    # Only finished shards: an interrupted render can leave ``shard-*.npy.tmp.npy`` behind.
    npys = sorted(p for p in folder.glob("shard-*.npy") if p.name[len("shard-") : -len(".npy")].isdigit())
    if not npys:
        raise FileNotFoundError(f"no shard-*.npy files in {folder}; render some with `safl synth --out {folder}`")
    arrays, labels, points = [], [], []
    for npy in npys:
        labs = npy.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
        arr = np.load(npy)
        if len(arr) != len(labs):
            raise ValueError(f"{npy}: {len(arr)} images but {len(labs)} labels")
        pts = npy.with_suffix(".pts.npy")
        points.append(np.load(pts) if pts.is_file() else None)  # renderer 3 and older wrote none
        arrays.append(arr)
        labels += labs
        if limit is not None and len(labels) >= limit:
            break
    images = np.concatenate(arrays)
    # Points for every crop or for none: a folder mixing both would teach the rectifier from a part.
    all_points = np.concatenate(points) if points and all(p is not None for p in points) else None
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
        all_points = None if all_points is None else all_points[:limit]
    return ArrayDataset(folder.name, images, labels, folder=str(folder), points=all_points)  # no per-sample sources: shards can be millions


def load_lmdb(path: str | Path, cfg: PreprocessConfig, limit: int | None = None, view_cfg: ViewConfig | None = None) -> ArrayDataset:
    """An LMDB in the STR layout (``num-samples``, ``image-%09d``, ``label-%09d``, 1-based);
    ``view_cfg`` as in ``load_folder``."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    try:
        with env.begin() as txn:
            raw = txn.get(b"num-samples")
            if raw is None:
                raise ValueError(f"{path} is not an STR LMDB: no num-samples key")
            n = int(raw)
            if limit is not None:
                n = min(n, limit)
            images, labels, keys = [], [], []
            for i in range(1, n + 1):
                img_bytes = txn.get(f"image-{i:09d}".encode())
                label = txn.get(f"label-{i:09d}".encode())
                if img_bytes is None or label is None:
                    continue
                with Image.open(io.BytesIO(img_bytes)) as im:
                    images.append(_views(im, cfg, view_cfg))
                labels.append(label.decode("utf-8"))
                keys.append(f"image-{i:09d}")
    finally:
        env.close()
    return _from_views(Path(path).name, images, labels, cfg, keys, str(path))


def shard_meta(path: str | Path) -> dict | None:
    """The ``meta.json`` that ``safl synth`` wrote into a shard folder (renderer version, seed,
    count, geometry, charset, text mix), or ``None`` when the folder has none."""
    meta = Path(path) / "meta.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def load_any(path: str | Path, cfg: PreprocessConfig, view_cfg: ViewConfig | None = None) -> ArrayDataset:
    """Shards, LMDB or ``labels.tsv`` folder, whichever ``path`` holds; ``view_cfg`` as in
    ``load_folder`` (shards hold resized crops only: no further views)."""
    p = Path(path)
    if (p / "labels.tsv").is_file():
        return load_folder(p, cfg, view_cfg=view_cfg)
    if any(p.glob("shard-*.npy")):
        m = shard_meta(p)
        if m is not None:
            if (m.get("height"), m.get("width"), m.get("channels")) != (cfg.height, cfg.width, cfg.channels):
                raise ValueError(
                    f"{p} was rendered at {m.get('height')}x{m.get('width')}x{m.get('channels')}, the model takes {cfg.height}x{cfg.width}x{cfg.channels}"
                )
        return load_shards(p)
    if (p / "data.mdb").is_file():
        return load_lmdb(p, cfg, view_cfg=view_cfg)
    raise FileNotFoundError(f"{p}: not a labels.tsv folder, a shard folder or an LMDB")


def augment(batch: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Cheap train-time augmentation of a normalised batch: small affine jitter, contrast,
    brightness and noise, all drawn from ``gen`` so a resumed run repeats them exactly."""
    return augment_with_points(batch, None, gen, strength)[0]


def augment_with_points(
    batch: torch.Tensor, points: torch.Tensor | None, gen: torch.Generator, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``augment``, and the fiducial points ``[B, F, 2]`` (normalised; NaN stays NaN) moved
    with the affine jitter, so they still lie on the text's edges. The same draws as
    ``augment``: a batch and a generator state give the same images with or without points."""
    b = batch.shape[0]
    if strength <= 0:
        return batch, points
    # Draws come from the CPU generator ``gen`` wherever the batch lives, so a GPU run
    # repeats its augmentation exactly on resume; only the image work runs on the device.
    r = lambda *shape: torch.rand(*shape, generator=gen).to(batch.device)  # noqa: E731
    angle = (r(b) - 0.5) * 0.1 * strength
    scale = 1.0 + (r(b) - 0.5) * 0.15 * strength
    tx = (r(b) - 0.5) * 0.08 * strength
    ty = (r(b) - 0.5) * 0.15 * strength
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin * 0.25, tx], 1), torch.stack([sin * 4.0, cos, ty], 1)], 1)
    apply = (r(b) < 0.5).float().view(b, 1, 1)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=batch.device).expand(b, 2, 3)
    theta = apply * theta + (1 - apply) * identity
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, padding_mode="border", align_corners=False)
    if points is not None:
        # Output position p samples the input at A p + t, so an input point q lands at A⁻¹ (q - t).
        inverse = torch.linalg.inv(theta[:, :, :2].float())
        points = ((points.float() - theta[:, None, :, 2]) @ inverse.transpose(1, 2)).to(points.dtype)
    contrast = 1.0 + (r(b, 1, 1, 1) - 0.5) * 0.6 * strength
    bright = (r(b, 1, 1, 1) - 0.5) * 0.3 * strength
    noise = torch.randn(out.shape, generator=gen).to(batch.device) * (r(b, 1, 1, 1) * 0.06 * strength)
    return (out * contrast + bright + noise).clamp_(-1.0, 1.0), points


def degrade(batch: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Photometric and resolution degradations seen in street photos but rare in the
    renderer's output, for a share of the samples that grows with ``strength``: low
    resolution (down- then up-sampled), washed-out contrast, gamma and inverted polarity.

    Draws come from ``gen`` (a fixed number per call), so a resumed run repeats them.
    """
    if strength <= 0:
        return batch
    b, _, h, w = batch.shape
    r = lambda *shape: torch.rand(*shape, generator=gen).to(batch.device)  # noqa: E731
    chosen = lambda p: (r(b, 1, 1, 1) < p * strength).float()  # noqa: E731
    # One resolution per batch keeps it a single interpolate; which samples get it varies.
    factor = 1.5 + 2.0 * float(r(1))
    small = F.interpolate(batch, size=(max(4, round(h / factor)), max(4, round(w / factor))), mode="area")
    lowres = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    m = chosen(0.3)
    out = m * lowres + (1 - m) * batch
    gamma = torch.exp((r(b, 1, 1, 1) - 0.5) * 1.4)
    m = chosen(0.2)
    out = m * (((out + 1) / 2).clamp(0, 1).pow(gamma) * 2 - 1) + (1 - m) * out
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    washed = mean + (out - mean) * (0.25 + 0.35 * r(b, 1, 1, 1)) + (r(b, 1, 1, 1) - 0.5) * 0.6
    m = chosen(0.2)
    out = m * washed + (1 - m) * out
    m = chosen(0.1)
    out = m * -out + (1 - m) * out
    return out.clamp_(-1.0, 1.0)

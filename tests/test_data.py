"""Dataset readers (labels.tsv folders, STR LMDBs, rendered shards), filtering, batching helpers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import render_word
from PIL import Image

from model import Charset, PreprocessConfig
from model.preprocess import ViewConfig, resize
from model.training.data import ArrayDataset, augment, degrade, load_any, load_folder, load_folder_part, load_lmdb, load_shards, read_labels_tsv
from model.training.split import SplitConfig, split_indices

CFG = PreprocessConfig()
LABELS = ["Hello", "world", "café", "New York", "x" * 30, "42", "STOP", "a-b", "Ünïcode", "ok"]


def _make_folder(folder: Path, labels: list[str] = LABELS) -> list[Image.Image]:
    """A labelled folder of real image files in assorted formats and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    images, lines = [], []
    for i, text in enumerate(labels):
        img = render_word(text[:12], (60 + 10 * i, 24 + 2 * i), "RGB" if i % 2 else "L")
        name = f"img_{i}.{'png' if i % 3 else 'jpg'}"
        img.save(folder / name)
        images.append(Image.open(folder / name))
        lines.append(f"{name}\t{text}")
    (folder / "labels.tsv").write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n", encoding="utf-8")
    return images


def _write_lmdb(path: Path, items: list[tuple[Image.Image, str]], num_samples: int | None = None, skip: set[int] = frozenset()) -> None:
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (img, label) in enumerate(items, 1):
            if i in skip:
                continue
            buf = io.BytesIO()
            img.save(buf, format="PNG" if i % 2 else "JPEG")
            txn.put(f"image-{i:09d}".encode(), buf.getvalue())
            txn.put(f"label-{i:09d}".encode(), label.encode("utf-8"))
        if num_samples is not None:
            txn.put(b"num-samples", str(num_samples).encode())
    env.close()


def _write_shards(folder: Path, sizes: list[int], meta: dict | None = None) -> tuple[np.ndarray, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    all_imgs, all_labels = [], []
    for k, n in enumerate(sizes):
        imgs = rng.integers(0, 256, (n, 32, 128), dtype=np.uint8)
        labels = [f"w{k}x{j}" for j in range(n)]
        np.save(folder / f"shard-{k:05d}.npy", imgs)
        (folder / f"shard-{k:05d}.txt").write_text("\n".join(labels) + "\n")
        all_imgs.append(imgs)
        all_labels += labels
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return np.concatenate(all_imgs), all_labels


# -- labels.tsv folders -------------------------------------------------------------------------


def test_load_folder(tmp_path: Path) -> None:
    originals = _make_folder(tmp_path / "real")
    ds = load_folder(tmp_path / "real", CFG)
    assert ds.name == "real" and len(ds) == len(LABELS)
    assert ds.labels == LABELS  # raw labels, blank lines skipped, unicode kept
    assert ds.images.shape == (len(LABELS), 32, 128) and ds.images.dtype == np.uint8
    for arr, img in zip(ds.images, originals):
        assert np.array_equal(arr, resize(img, CFG))


def test_read_labels_tsv_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no labels.tsv"):
        read_labels_tsv(tmp_path)
    (tmp_path / "labels.tsv").write_text("a.png\tok\nb.png no tab\n")
    with pytest.raises(ValueError, match=r"labels.tsv:2: expected 'file<TAB>text'"):
        read_labels_tsv(tmp_path)
    (tmp_path / "labels.tsv").write_text("a.png\ttab\tinside\n")
    assert read_labels_tsv(tmp_path) == [("a.png", "tab\tinside")]


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "labels.tsv").write_text("\n")
    ds = load_folder(tmp_path, CFG)
    assert len(ds) == 0 and ds.images.shape == (0, 32, 128)


def test_folder_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    labels = [f"w{i}" for i in range(20)]
    _make_folder(tmp_path / "f", labels)
    split = SplitConfig(0.3, seed=0, block=2)
    val = load_folder_part(tmp_path / "f", CFG, "val", split)
    train = load_folder_part(tmp_path / "f", CFG, "train", split)
    everything = load_folder_part(tmp_path / "f", CFG, "all")
    assert len(val) == 6 and len(train) == 14
    assert set(val.labels).isdisjoint(train.labels)
    assert sorted(val.labels + train.labels) == sorted(everything.labels)
    assert val.name == "f-val" and train.name == "f-train"
    # Images follow their labels.
    for ds in (val, train):
        for img, lab in zip(ds.images, ds.labels):
            assert np.array_equal(img, everything.images[labels.index(lab)])
    again = load_folder_part(tmp_path / "f", CFG, "val", split)
    assert again.labels == val.labels
    other = load_folder_part(tmp_path / "f", CFG, "val", SplitConfig(0.3, seed=1, block=2))
    assert other.labels != val.labels
    with pytest.raises(ValueError, match="unknown part"):
        load_folder_part(tmp_path / "f", CFG, "test")


def test_tall_crops_carry_their_turned_views_through_split_and_filter(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    labels = [f"w{i}" if i % 3 else "w€" for i in range(20)]  # every third label is dropped by filtered()
    tall = {i for i in range(20) if i % 2}
    lines = []
    for i, lab in enumerate(labels):
        img = render_word(f"w{i}", (90, 30))
        if i in tall:
            img = img.transpose(Image.Transpose.ROTATE_90)
        img.save(folder / f"{i}.png")
        lines.append(f"{i}.png\t{lab}")
    (folder / "labels.tsv").write_text("\n".join(lines) + "\n")
    turn_only = ViewConfig(contrast=False)
    everything = load_folder(folder, CFG, view_cfg=turn_only)
    assert set(everything.extra_views) == tall
    assert all(v.shape == (2, 32, 128) and v.dtype == np.uint8 for v in everything.extra_views.values())
    # By default only the tall crops have further views (the same as turn_only); with the
    # contrast views every crop also has 2 (8 further views for a tall one); training asks for none.
    assert load_folder(folder, CFG).extra_views.keys() == tall
    every_view = load_folder(folder, CFG, view_cfg=ViewConfig(contrast=True))
    assert {i: len(v) for i, v in every_view.extra_views.items()} == {i: 8 if i in tall else 2 for i in range(20)}
    assert load_folder(folder, CFG, view_cfg=None).extra_views == {}
    for part in ("val", "train"):
        ds = load_folder_part(folder, CFG, part, SplitConfig(block=3), view_cfg=turn_only).filtered(Charset(), 25)
        for k, (img, lab) in enumerate(zip(ds.images, ds.labels)):
            i = next(i for i in range(20) if np.array_equal(everything.images[i], img))
            assert lab == labels[i]
            if i in tall:
                assert np.array_equal(ds.extra_views[k], everything.extra_views[i])
            else:
                assert k not in ds.extra_views


def test_split_keeps_blocks_and_labels_apart() -> None:
    # 10 scenes of 10 crops; "SALE" recurs in every other scene, in either case.
    labels = [("SALE" if i % 4 else "sale") if j == 0 and i % 2 == 0 else f"s{i}w{j}" for i in range(10) for j in range(10)]
    cfg = SplitConfig(0.3, seed=7, block=10)
    val, train = split_indices(labels, cfg)
    assert (val, train) == split_indices(labels, cfg)  # deterministic
    val_blocks = {i // 10 for i in val}
    assert len(val_blocks) == 3 and len(val) == 30  # whole blocks, 30 % of them
    assert val_blocks.isdisjoint(i // 10 for i in train)
    val_words = {labels[i].casefold() for i in val}
    assert val_words.isdisjoint(labels[i].casefold() for i in train)
    branches = set()
    for seed in range(10):  # both cases: SALE among the validation words or not
        val, train = split_indices(labels, SplitConfig(0.3, seed=seed, block=10))
        blocks = {i // 10 for i in val}
        left_out = set(range(100)) - set(val) - set(train)
        in_val = "sale" in {labels[i].casefold() for i in val}
        branches.add(in_val)
        # With SALE in validation every other SALE crop is left out of the fine-tune part.
        assert left_out == ({i for i in range(100) if i // 10 not in blocks and labels[i].casefold() == "sale"} if in_val else set())
    assert branches == {True, False}
    # Words match as scored: "SALE," in validation keeps "sale" out of the fine-tune part.
    words = ["SALE,", *(f"x{i}" for i in range(9)), *["sale"] * 10]
    for seed in range(5):
        v, t = split_indices(words, SplitConfig(0.5, seed=seed, block=10))
        assert not ({words[i] for i in v} & {"SALE,", "sale"} and {words[i] for i in t} & {"SALE,", "sale"})
    assert split_indices([], cfg) == ([], [])
    assert split_indices(labels, SplitConfig(0.3, seed=8, block=10))[0] != val
    with pytest.raises(ValueError, match="block"):
        SplitConfig(block=0)
    with pytest.raises(ValueError, match="val_fraction"):
        SplitConfig(val_fraction=1.5)


# -- filtering ------------------------------------------------------------------------------------


def test_filtered_by_charset_and_max_len(tmp_path: Path) -> None:
    _make_folder(tmp_path / "f")
    ds = load_folder(tmp_path / "f", CFG)
    kept = ds.filtered(Charset(), max_len=25)
    # café / Ünïcode folded to ASCII, the 30-char label dropped; spaces removed.
    assert kept.labels == ["Hello", "world", "cafe", "NewYork", "42", "STOP", "a-b", "Unicode", "ok"]
    assert len(kept.images) == 9
    assert np.array_equal(kept.images[3], ds.images[3])
    assert ds.filtered(Charset(), max_len=4).labels == ["cafe", "42", "STOP", "a-b", "ok"]
    digits = ds.filtered(Charset("0123456789"), 25)
    assert digits.labels == ["42"] and digits.images.shape == (1, 32, 128)
    none = ds.filtered(Charset("#"), 25)
    assert none.labels == [] and none.images.shape == (0, 32, 128)


def test_filtered_returns_itself_when_nothing_changes() -> None:
    ds = ArrayDataset("d", np.zeros((2, 32, 128), np.uint8), ["ab", "cd"])
    assert ds.filtered(Charset(), 25) is ds


# -- LMDB -----------------------------------------------------------------------------------------


def test_load_lmdb_str_layout(tmp_path: Path) -> None:
    words = ["Hello", "world", "café", "42", "STOP"]
    imgs = [render_word(w, (90, 30)) for w in words]
    _write_lmdb(tmp_path / "db", list(zip(imgs, words)), num_samples=len(words))
    ds = load_lmdb(tmp_path / "db", CFG)
    assert ds.labels == words and ds.name == "db"
    assert ds.images.shape == (5, 32, 128)
    assert np.array_equal(ds.images[0], resize(imgs[0], CFG))  # PNG entries are lossless
    assert load_lmdb(tmp_path / "db", CFG, limit=2).labels == words[:2]
    assert load_any(tmp_path / "db", CFG).labels == words
    assert ds.filtered(Charset(), 25).labels == ["Hello", "world", "cafe", "42", "STOP"]


def test_load_lmdb_skips_missing_entries(tmp_path: Path) -> None:
    words = ["one", "two", "three"]
    _write_lmdb(tmp_path / "db", [(render_word(w), w) for w in words], num_samples=3, skip={2})
    assert load_lmdb(tmp_path / "db", CFG).labels == ["one", "three"]


def test_load_lmdb_without_num_samples(tmp_path: Path) -> None:
    _write_lmdb(tmp_path / "db", [(render_word("a"), "a")], num_samples=None)
    with pytest.raises(ValueError, match="no num-samples"):
        load_lmdb(tmp_path / "db", CFG)


# -- shards ---------------------------------------------------------------------------------------


def test_load_shards(tmp_path: Path) -> None:
    images, labels = _write_shards(tmp_path / "s", [5, 5, 3])
    ds = load_shards(tmp_path / "s")
    assert ds.labels == labels and np.array_equal(ds.images, images)
    limited = load_shards(tmp_path / "s", limit=7)
    assert limited.labels == labels[:7] and np.array_equal(limited.images, images[:7])
    via_any = load_any(tmp_path / "s", CFG)
    assert via_any.labels == labels


def test_load_shards_ignores_an_interrupted_render(tmp_path: Path) -> None:
    _, labels = _write_shards(tmp_path / "s", [4])
    np.save(tmp_path / "s" / "shard-00001.npy.tmp.npy", np.zeros((2, 32, 128), np.uint8))
    (tmp_path / "s" / "shard-00001.txt.tmp").write_text("x\ny\n")
    assert load_shards(tmp_path / "s").labels == labels
    assert load_any(tmp_path / "s", CFG).labels == labels


def test_shard_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shard"):
        load_shards(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a labels.tsv folder"):
        load_any(tmp_path / "empty", CFG)
    _write_shards(tmp_path / "bad", [3])
    (tmp_path / "bad" / "shard-00000.txt").write_text("only\ntwo\n")
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_shards(tmp_path / "bad")
    _write_shards(tmp_path / "geom", [2], meta={"height": 48, "width": 160, "channels": 1})
    with pytest.raises(ValueError, match="rendered at 48x160x1"):
        load_any(tmp_path / "geom", CFG)
    _write_shards(tmp_path / "ok", [2], meta={"height": 32, "width": 128, "channels": 1})
    assert len(load_any(tmp_path / "ok", CFG)) == 2


# -- batch helpers --------------------------------------------------------------------------------


def test_augment_is_reproducible_and_bounded() -> None:
    from model.preprocess import to_tensor

    batch = to_tensor(np.stack([resize(render_word(w), CFG) for w in ("Hello", "world", "42", "ok")]))
    a = augment(batch, torch.Generator().manual_seed(0))
    b = augment(batch, torch.Generator().manual_seed(0))
    c = augment(batch, torch.Generator().manual_seed(1))
    assert a.shape == batch.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    assert augment(batch, torch.Generator().manual_seed(0), strength=0.0) is batch


def test_degrade_is_reproducible_bounded_and_off_by_default() -> None:
    from model.preprocess import to_tensor

    batch = to_tensor(np.stack([resize(render_word(w), CFG) for w in ("Hello", "world", "42", "ok")] * 8))
    a = degrade(batch, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(a, degrade(batch, torch.Generator().manual_seed(0), 1.0))
    assert not torch.equal(a, degrade(batch, torch.Generator().manual_seed(1), 1.0))
    assert a.shape == batch.shape and float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    changed = (a - batch).abs().flatten(1).amax(1) > 1e-6
    # A share of the samples is degraded, not all: the clean look stays in training.
    assert 0 < int(changed.sum()) < len(batch)
    # Off (the default) it draws nothing, so earlier runs resume with the same batches.
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert degrade(batch, gen, 0.0) is batch and torch.equal(gen.get_state(), state)


def test_unseen_validation_crops_were_in_neither_legacy_part_nor_label() -> None:
    from model.training.split import legacy_split_indices, unseen_val_indices

    labels = [f"w{i % 37}" for i in range(200)]  # recurring words
    unseen = unseen_val_indices(labels)
    val, _ = split_indices(labels)
    legacy_val, legacy_train = legacy_split_indices(len(labels))
    assert set(unseen) <= set(val) & set(legacy_val)
    assert {labels[i] for i in unseen}.isdisjoint(labels[i] for i in legacy_train)
    distinct = [f"u{i}" for i in range(200)]  # no shared words: every val crop the legacy val also held
    assert unseen_val_indices(distinct) == sorted(set(split_indices(distinct)[0]) & set(legacy_split_indices(200)[0]))


def test_val_unseen_part_loads(tmp_path: Path) -> None:
    labels = [f"w{i}" for i in range(40)]
    _make_folder(tmp_path / "f", labels)
    part = load_folder_part(tmp_path / "f", CFG, "val-unseen")
    assert part.name == "f-val-unseen" and 0 < len(part) < len(load_folder_part(tmp_path / "f", CFG, "val"))
    with pytest.raises(ValueError, match="val-unseen"):
        load_folder_part(tmp_path / "f", CFG, "test")

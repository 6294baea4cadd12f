"""Teaching the rectifier from the renderer's geometry (issue 31, lever 1): the fiducial
points the renderer stores with each crop, their targets and loss, and the trainer's
``--point-loss`` / ``--rectifier-only``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_words, write_shards

from model import SAFL, SAFLConfig
from model.charset import DEFAULT_CHARS
from model.loss import point_loss
from model.preprocess import to_tensor
from model.rectify import MAX_LOG_ZOOM, MAX_SHIFT, TPSGridGenerator, point_targets
from model.training.data import augment, augment_with_points, load_shards
from model.training.fonts import discover_fonts
from model.training.synth import PLAIN, Renderer, SynthConfig, render_dataset
from model.training.train import TrainConfig, Trainer, TrainingSetupError

#: Clean crops, loose margins: one geometric step at a time, nothing that blurs or hides the ink.
CLEAN = dataclasses.replace(PLAIN, seed=3, p_tight=0.0)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory):
    return discover_fonts(DEFAULT_CHARS, cache=tmp_path_factory.mktemp("fonts") / "fonts.json")


def _bend(img: np.ndarray, background: float) -> float:
    """How far the text's centre line bends and tilts: the spread of a parabola fitted to
    the ink's mean row over the columns with ink (letter shapes add only wiggles the
    parabola does not follow), as a share of the ink's height; NaN for too little ink."""
    ink = np.abs(img.astype(np.float32) - background) > 60
    cols = np.nonzero(ink.sum(axis=0) >= 2)[0]
    ink_rows = np.nonzero(ink.any(axis=1))[0]
    if len(cols) <= 8:
        return float("nan")
    rows = np.arange(img.shape[0], dtype=np.float32)[:, None]
    centre = (ink[:, cols] * rows).sum(axis=0) / ink[:, cols].sum(axis=0)
    smooth = np.polyval(np.polyfit(cols, centre, 2), cols)
    return float(np.std(smooth) / (ink_rows.max() - ink_rows.min() + 1))


def _rectified(img: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The crop through the TPS that maps ``points`` onto the output's borders (a perfect rectifier)."""
    grid = TPSGridGenerator(len(points), img.shape[0], img.shape[1])(torch.from_numpy(points)[None].float())
    out = F.grid_sample(to_tensor(img[None]), grid, padding_mode="border", align_corners=False)
    return ((out[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["curve", "arc", "perspective", "rotate"])
def test_the_points_straighten_what_the_geometry_bent(faces, kind: str) -> None:
    # Bent text's centre line wanders across the crop's rows; through the TPS that maps the
    # stored points flat it runs level. So the points lie on the text's real edges. Glyphs of
    # one height (H) keep letter shapes out of the centre line.
    renderer = Renderer(dataclasses.replace(CLEAN, **{f"p_{kind}": 1.0}), faces)
    renderer.sampler.sample = lambda rng: "HHHHHHHH"
    before, after = [], []
    for i in range(10):
        img, _, points = renderer.render_with_points(i)
        if np.isnan(points).any():
            continue
        background = float(np.median(img))  # flat, and most of a bent crop (not of a rectified one)
        before.append(_bend(img, background))
        after.append(_bend(_rectified(img, points), background))
    # Measured: 0.066 → 0.007 (parabola), 0.146 → 0.020 (arc), 0.046 → 0.008 (perspective),
    # 0.118 → 0.005 (rotation); straight crops 0.007 → 0.005.
    assert np.nanmean(after) < 0.3 * np.nanmean(before) and np.nanmean(after) < 0.03, (kind, np.nanmean(before), np.nanmean(after))


def test_straight_crops_keep_their_points_on_the_ink_box(faces) -> None:
    renderer = Renderer(CLEAN, faces)
    for i in range(8):
        img, _, points = renderer.render_with_points(i)
        k = len(points) // 2
        top, bottom = points[:k], points[k:]
        assert np.allclose(top[:, 1], top[0, 1]) and np.allclose(bottom[:, 1], bottom[0, 1])  # level edges
        assert np.all(np.diff(top[:, 0]) > 0) and np.allclose(top[:, 0], bottom[:, 0])
        ink = np.nonzero((np.abs(img.astype(np.float32) - np.median(img)) > 60).any(axis=1))[0]
        rows = (np.array([top[0, 1], bottom[0, 1]]) + 1) / 2 * img.shape[0]
        # The ink box's rows, to a pixel and a half (stretching to 32 rows blurs the ink's edge).
        assert rows[0] - 1.5 <= ink.min() and ink.max() <= rows[1] + 1.5, (rows, ink.min(), ink.max())


def test_the_points_change_no_image(faces) -> None:
    renderer = Renderer(SynthConfig(seed=11), faces)
    for i in range(20):
        img, label, points = renderer.render_with_points(i)
        again, label_again = renderer.render(i)
        assert np.array_equal(img, again) and label == label_again
        assert points.shape == (SynthConfig().fiducial_points, 2) and points.dtype == np.float32


def test_shards_carry_the_points_through_filter_and_subset(tmp_path: Path, faces) -> None:
    out = tmp_path / "synth"
    out.mkdir()
    render_dataset(out, 12, SynthConfig(seed=4), workers=1, shard_size=8, progress=False)
    ds = load_shards(out)
    assert ds.points is not None and ds.points.shape == (12, 20, 2) and ds.points.dtype == np.float16
    renderer = Renderer(SynthConfig(seed=4), faces)
    sub = ds.subset([7, 2])
    np.testing.assert_array_equal(sub.points[0], renderer.render_with_points(7)[2].astype(np.float16))
    assert sub.labels[1] == renderer.render(2)[1]
    # A folder from an older renderer (no .pts.npy) loads as before, with no points.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for p in old.glob("*.pts.npy"):
        p.unlink()
    assert load_shards(old).points is None and load_shards(old).labels == ds.labels


def test_augmentation_moves_the_points_with_the_image() -> None:
    gen = torch.Generator().manual_seed(5)
    b = 64
    images = torch.full((b, 1, 32, 128), -1.0)
    ys, xs = torch.randint(8, 24, (b,), generator=gen), torch.randint(24, 104, (b,), generator=gen)
    images[torch.arange(b), 0, ys, xs] = 1.0  # one bright pixel per crop
    centres = torch.stack([(2 * xs + 1) / 128 - 1, (2 * ys + 1) / 32 - 1], dim=1).float()
    points = centres[:, None, :].expand(b, 20, 2).clone()
    points[3] = float("nan")
    out, moved = augment_with_points(images.clone(), points, torch.Generator().manual_seed(0), strength=1.0)
    assert torch.equal(out, augment(images.clone(), torch.Generator().manual_seed(0), strength=1.0))  # the same draws
    assert torch.isnan(moved[3]).all()
    for i in (0, 1, 2, 4, 5, 6, 7):
        img = out[i, 0]
        flat = int(torch.argmax(img))
        y, x = divmod(flat, img.shape[1])
        got = torch.tensor([(2 * x + 1) / 128 - 1, (2 * y + 1) / 32 - 1])
        # Within a pixel and a half of where the brightest remaining pixel is.
        assert abs(got[0] - moved[i, 0, 0]) < 3 / 128 and abs(got[1] - moved[i, 0, 1]) < 3 / 32, (i, got, moved[i, 0])


def test_point_targets_stay_reachable_and_keep_unknown_crops_unknown() -> None:
    k = 10
    xs = torch.linspace(-0.5, 0.5, k)  # a narrow word: narrower than the head's smallest span
    edges = torch.stack([torch.stack([xs, torch.full((k,), -0.4)], 1), torch.stack([xs, torch.full((k,), 0.4)], 1)]).reshape(1, 2 * k, 2)
    wide = torch.stack([torch.stack([xs * 1.8, torch.full((k,), -0.9)], 1), torch.stack([xs * 1.8, torch.full((k,), 0.9)], 1)]).reshape(1, 2 * k, 2)
    unknown = torch.full((1, 2 * k, 2), float("nan"))
    t = point_targets(torch.cat([edges, wide, unknown]), max_offset=0.75, aspect=4.0)
    assert torch.isnan(t[2]).all() and not torch.isnan(t[:2]).any()
    for row in t[:2]:
        for edge, border in ((row[:k], -1.0), (row[k:], 1.0)):
            span = edge[-1, 0] - edge[0, 0]
            assert 2 * np.exp(-MAX_LOG_ZOOM) <= span <= 2 * np.exp(MAX_LOG_ZOOM)
            assert abs((edge[-1, 0] + edge[0, 0]) / 2) <= MAX_SHIFT
            assert (edge[:, 1] - border).abs().max() <= 0.75
    # The narrow word's band grows by 10 % of its height above and below; the wide word's
    # stops at the crop's border, and so do its ends.
    torch.testing.assert_close(t[0, 0, 1], torch.tensor(-0.4 - 0.08))
    torch.testing.assert_close(t[0, k, 1], torch.tensor(0.4 + 0.08))
    torch.testing.assert_close(t[1, 0, 1], torch.tensor(-1.0))
    torch.testing.assert_close(t[1, k, 1], torch.tensor(1.0))
    assert t[1, :, 0].min() >= -1.0 and t[1, :, 0].max() <= 1.0


def test_point_loss_counts_only_the_crops_with_geometry() -> None:
    predicted = torch.zeros(3, 4, 2, requires_grad=True)
    target = torch.stack([torch.full((4, 2), 0.5), torch.full((4, 2), float("nan")), torch.full((4, 2), 0.5)])
    loss = point_loss(predicted, target)
    torch.testing.assert_close(loss, torch.tensor(0.5 - 0.025))  # smooth L1 with beta 0.05, linear part
    loss.backward()
    assert predicted.grad[1].abs().sum() == 0 and predicted.grad[0].abs().sum() > 0
    none = point_loss(predicted, torch.full((3, 4, 2), float("nan")))
    assert none.item() == 0.0 and none.requires_grad


def test_forward_with_points_is_the_plain_forward_and_the_rectifiers_points() -> None:
    torch.manual_seed(0)
    model = SAFL(SAFLConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        model.rectifier.fc.weight.normal_(0, 0.05)  # a rectifier that warps
    images, tokens = torch.randn(2, 1, 32, 128), torch.randint(3, 20, (2, 5))
    logits, points = model(images, tokens, return_points=True)
    torch.testing.assert_close(logits, model(images, tokens))
    torch.testing.assert_close(points, model.rectifier.points(images))
    no_tps = SAFL(dataclasses.replace(SAFLConfig.from_preset("tiny"), use_tps=False))
    with pytest.raises(ValueError, match="no rectifier"):
        no_tps(images, tokens, return_points=True)


@pytest.fixture(scope="module")
def point_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth-points") / "synth"
    out.mkdir()
    render_dataset(out, 96, SynthConfig(seed=6), workers=1, shard_size=96, progress=False)
    return out


def _cfg(out: Path, synth: Path, **overrides) -> TrainConfig:
    values = dict(out=str(out), preset="tiny", synth=[str(synth)], total_steps=12, batch_size=32, lr=3e-3, warmup_steps=2, threads=1, progress=False)
    values.update(val_every=0, log_every=4, checkpoint_minutes=1e9, amp="off")
    return TrainConfig(**(values | overrides))


def test_rectifier_only_trains_the_rectifier_alone_and_lowers_the_point_loss(tmp_path: Path, point_shards: Path) -> None:
    trainer = Trainer(_cfg(tmp_path / "run", point_shards, rectifier_only=True, point_loss=1.0, tps_lr_scale=1.0, total_steps=40))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("rectifier.") for k in changed)
    assert any(k.startswith("rectifier.fc.") for k in changed)
    losses = [
        r["loss"]
        for r in (json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines())
        if "loss" in r and "step" in r and "val" not in r
    ]
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 0.154 → 0.120 in 40 steps


def test_point_loss_joins_the_recognition_loss(tmp_path: Path, point_shards: Path) -> None:
    trainer = Trainer(_cfg(tmp_path / "run", point_shards, point_loss=1.0, tps_lr_scale=1.0))
    fc = trainer.model.rectifier.fc.weight.clone()
    trainer.run()
    assert not torch.equal(fc, trainer.model.rectifier.fc.weight)  # the points taught it from step 1


def test_point_loss_without_points_in_the_data_is_a_setup_error(tmp_path: Path) -> None:
    folder = tmp_path / "old-shards"
    folder.mkdir()
    write_shards(folder, random_words(16, seed=1))
    with pytest.raises(TrainingSetupError, match="no training crop carries fiducial points"):
        Trainer(_cfg(tmp_path / "run", folder, point_loss=1.0))
    with pytest.raises(ValueError, match="--rectifier-only"):
        _cfg(tmp_path / "run2", folder, rectifier_only=True)


def test_detached_points_keep_the_recognition_loss_off_the_rectifier() -> None:
    # Reaching the rectifier, the recognition loss taught it to cut off the first letter
    # (v4-loc-b, step 3,000): with detach_points only the point loss teaches it.
    torch.manual_seed(0)
    model = SAFL(SAFLConfig.from_preset("tiny"))
    with torch.no_grad():
        model.rectifier.fc.weight.normal_(0, 0.05)
    images, tokens = torch.randn(2, 1, 32, 128), torch.randint(3, 20, (2, 5))
    logits, points = model(images, tokens, return_points=True, detach_points=True)
    logits.sum().backward()
    assert all(p.grad is None for p in model.rectifier.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)  # the encoder still learns
    points.sum().backward()
    assert model.rectifier.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--rectifier-points-only"):
        TrainConfig(rectifier_points_only=True)

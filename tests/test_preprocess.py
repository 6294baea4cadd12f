"""The one image path shared by training and serving: modes, EXIF, geometry, range.

Every image is written to a real file in its format and decoded again by Pillow, so the
test sees what an upload or a labelled folder would give the model.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import render_word
from PIL import Image, ImageOps

from model.preprocess import PreprocessConfig, ViewConfig, canonicalize, collate, preprocess, resize, to_tensor, views

CFG = PreprocessConfig()
SIZE = (160, 40)  # not the model size: every case is also resized


def _reference() -> Image.Image:
    """Black text on white, in L."""
    return render_word("Hello", SIZE)


def _bilevel() -> Image.Image:
    return _reference().point(lambda v: 255 if v >= 128 else 0)


def _roundtrip(img: Image.Image, fmt: str, **save) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    buf.seek(0)
    return Image.open(buf)


def _la() -> Image.Image:
    # Black ink whose opacity is the darkness: on white it looks exactly like the reference.
    ref = _reference()
    alpha = ref.point(lambda v: 255 - v)
    return Image.merge("LA", (Image.new("L", SIZE, 0), alpha))


def _rgba() -> Image.Image:
    ref = _reference()
    alpha = ref.point(lambda v: 255 - v)
    black = Image.new("L", SIZE, 0)
    return Image.merge("RGBA", (black, black, black, alpha))


def _p_transparent() -> Image.Image:
    # Palette index 0 is *black* but transparent (the background), index 1 opaque black text.
    mask = np.asarray(_bilevel()) == 0
    p = Image.fromarray(mask.astype(np.uint8), mode="P")
    p.putpalette([0, 0, 0, 0, 0, 0] + [0, 0, 0] * 254)
    p.info["transparency"] = 0
    return p


def _i16() -> Image.Image:
    arr = np.asarray(_reference()).astype(np.uint16) * 257  # full 16-bit range
    return Image.fromarray(arr)


def _float01() -> Image.Image:
    return Image.fromarray(np.asarray(_reference()).astype(np.float32) / 255.0, mode="F")


def _float255() -> Image.Image:
    return Image.fromarray(np.asarray(_reference()).astype(np.float32), mode="F")


# (name, image factory, file format, expected mode after decoding, reference factory, tolerance)
CASES: list[tuple[str, Callable[[], Image.Image], str, str, Callable[[], Image.Image], int]] = [
    ("L", _reference, "PNG", "L", _reference, 0),
    ("LA", _la, "PNG", "LA", _reference, 1),
    ("P_transparency", _p_transparent, "PNG", "P", _bilevel, 0),
    ("P_opaque", lambda: _reference().convert("RGB").convert("P"), "PNG", "P", _reference, 8),
    ("RGB", lambda: _reference().convert("RGB"), "PNG", "RGB", _reference, 1),
    ("RGB_jpeg", lambda: _reference().convert("RGB"), "JPEG", "RGB", _reference, 40),
    ("RGBA", _rgba, "PNG", "RGBA", _reference, 1),
    ("CMYK", lambda: _reference().convert("RGB").convert("CMYK"), "TIFF", "CMYK", _reference, 1),
    ("CMYK_jpeg", lambda: _reference().convert("RGB").convert("CMYK"), "JPEG", "CMYK", _reference, 40),
    ("I16", _i16, "PNG", "I;16", _reference, 1),
    ("1", lambda: _bilevel().convert("1"), "PNG", "1", _bilevel, 0),
    ("F_unit", _float01, "TIFF", "F", _reference, 1),
    ("F_255", _float255, "TIFF", "F", _reference, 1),
]


@pytest.mark.parametrize("name,make,fmt,mode,make_ref,tol", CASES, ids=[c[0] for c in CASES])
def test_every_mode_gives_the_same_pixels(name, make, fmt, mode, make_ref, tol) -> None:
    img = _roundtrip(make(), fmt)
    assert img.mode == mode
    got = resize(img, CFG).astype(np.int16)
    want = resize(make_ref(), CFG).astype(np.int16)
    assert got.shape == (32, 128)
    diff = np.abs(got - want)
    if tol <= 1:
        assert diff.max() <= tol, f"{name}: max diff {diff.max()}"
    else:  # lossy formats / palette quantisation: close on average, no gross error
        assert diff.mean() <= tol / 4 and diff.max() <= 4 * tol, f"{name}: diff mean {diff.mean()}, max {diff.max()}"
    t = preprocess(img, CFG)
    assert t.shape == (1, 32, 128) and t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert float(t[0, 0, -1]) > 0.9  # the top-right corner is paper (white) in every mode
    assert float(t.min()) < -0.5  # and there is dark ink


def test_transparent_pixels_become_white_not_their_hidden_colour() -> None:
    # Fully transparent black everywhere: must read as blank white paper.
    img = _roundtrip(Image.new("RGBA", (50, 20), (0, 0, 0, 0)), "PNG")
    assert torch.all(preprocess(img, CFG) == 1.0)
    img = _roundtrip(Image.new("LA", (50, 20), (0, 0)), "PNG")
    assert torch.all(preprocess(img, CFG) == 1.0)


def test_16_bit_is_scaled_not_clipped() -> None:
    # Pillow's own convert("L") would clip 16-bit values at 255 (an all-white image).
    arr = np.full((20, 50), 32896, np.uint16)  # 50 % grey in 16 bits
    img = _roundtrip(Image.fromarray(arr), "PNG")
    assert img.mode == "I;16"
    out = resize(img, CFG)
    assert abs(int(out.mean()) - 128) <= 1


def test_rgb_model_input() -> None:
    cfg = PreprocessConfig(channels=3)
    img = _roundtrip(Image.new("RGB", (60, 20), (255, 0, 0)), "PNG")
    t = preprocess(img, cfg)
    assert t.shape == (3, 32, 128)
    assert torch.allclose(t[0], torch.ones(32, 128)) and torch.allclose(t[1], -torch.ones(32, 128))
    # Grayscale and alpha inputs become 3 equal channels.
    t = preprocess(_roundtrip(_rgba(), "PNG"), cfg)
    assert t.shape == (3, 32, 128)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


@pytest.mark.parametrize("orientation,stored_as", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(orientation: int, stored_as: Image.Transpose) -> None:
    """A phone photo is stored rotated with an EXIF tag; the model must see it upright."""
    upright = _reference()
    stored = upright.transpose(stored_as)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = _roundtrip(stored, "PNG", exif=exif.tobytes())
    assert img.getexif().get(0x0112) == orientation
    assert img.size == stored.size
    assert np.array_equal(resize(img, CFG), resize(upright, CFG))
    # And a JPEG (where EXIF usually lives), compared loosely.
    jpg = _roundtrip(stored.convert("RGB"), "JPEG", exif=exif.tobytes(), quality=95)
    diff = np.abs(resize(jpg, CFG).astype(int) - resize(upright, CFG).astype(int))
    assert diff.mean() < 6


def test_animation_uses_first_frame() -> None:
    frames = [render_word("one", SIZE).convert("P"), render_word("two", SIZE).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    buf.seek(0)
    img = Image.open(buf)
    assert img.n_frames == 2
    img.seek(1)  # even if the caller left it on another frame
    assert np.array_equal(resize(img, CFG), resize(render_word("one", SIZE), CFG))


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (3000, 20), (128, 32)])
def test_any_size_is_stretched_to_the_model_input(size: tuple[int, int]) -> None:
    out = resize(Image.new("L", size, 200), CFG)
    assert out.shape == (32, 128) and out.dtype == np.uint8
    assert np.all(out == 200)


def test_canonicalize_keeps_size_and_gives_l_or_rgb() -> None:
    img = _rgba()
    assert canonicalize(img, 1).mode == "L" and canonicalize(img, 1).size == SIZE
    assert canonicalize(img, 3).mode == "RGB"


def test_to_tensor_range_and_layout() -> None:
    arr = np.array([[0, 255], [127, 128]], np.uint8)
    t = to_tensor(np.tile(arr, (16, 64)))
    assert t.shape == (1, 32, 128) and t.dtype == torch.float32
    assert float(t.min()) == -1.0 and float(t.max()) == 1.0
    batch = to_tensor(np.zeros((5, 32, 128), np.uint8))
    assert batch.shape == (5, 1, 32, 128)
    rgb = to_tensor(np.zeros((5, 32, 128, 3), np.uint8))
    assert rgb.shape == (5, 3, 32, 128)
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(np.zeros((32, 128), np.float32))


def test_collate() -> None:
    imgs = [preprocess(render_word(w), CFG) for w in ("a", "bb", "ccc")]
    assert collate(imgs).shape == (3, 1, 32, 128)
    with pytest.raises(ValueError):
        collate([])


@pytest.mark.parametrize("kwargs", [{"channels": 2}, {"height": 4}, {"width": 7}])
def test_preprocess_config_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(**kwargs)


def test_service_and_training_share_this_code(tmp_path) -> None:
    """The service, the renderer and the data loaders all call these very functions."""
    import model.preprocess as mp
    import service.images as service_images
    from model.training import data, synth
    from service import predictor

    assert service_images.views is mp.views and service_images.to_tensor is mp.to_tensor
    assert predictor.preprocess is mp.preprocess
    assert synth.resize is mp.resize and data.views is mp.views

    # A labelled folder stores resize() output; to_tensor of it is exactly preprocess() of the file.
    img = _roundtrip(_rgba(), "PNG")
    img.save(tmp_path / "w.png")
    (tmp_path / "labels.tsv").write_text("w.png\tHello\n")
    ds = data.load_folder(tmp_path, CFG)
    with Image.open(tmp_path / "w.png") as im:
        served = mp.preprocess(im, CFG)
    assert torch.equal(to_tensor(ds.images[0]), served)


UPRIGHT = ViewConfig(turn_tall=False, contrast=False)
CONTRAST = ViewConfig(contrast=True)


def test_the_first_view_is_the_training_pixels_and_the_rest_are_asked_for() -> None:
    img = _roundtrip(_rgba(), "PNG")
    first, stretched, equalised = views(img, CFG, CONTRAST)
    assert np.array_equal(first, resize(img, CFG))
    assert np.array_equal(stretched, np.asarray(ImageOps.autocontrast(Image.fromarray(first), cutoff=5)))
    assert np.array_equal(equalised, np.asarray(ImageOps.equalize(Image.fromarray(first))))
    (only,) = views(img, CFG, UPRIGHT)
    assert np.array_equal(only, first)
    rgb = PreprocessConfig(channels=3)
    assert [v.shape for v in views(img, rgb, CONTRAST)] == [(32, 128, 3)] * 3


def test_contrast_views_stretch_a_faded_crop() -> None:
    faded = render_word("Hello", SIZE).point(lambda v: 110 + v * 40 // 255)  # grey on grey: 110..150
    first, stretched, equalised = views(faded, CFG, CONTRAST)
    assert int(first.max()) - int(first.min()) <= 40
    assert stretched.min() == 0 and stretched.max() == 255
    assert equalised.max() - equalised.min() > 200


@pytest.mark.parametrize("size", [(40, 40), (39, 40)])
def test_only_a_crop_taller_than_wide_is_also_turned(size: tuple[int, int]) -> None:
    img = render_word("ab", size)
    tall = size[1] > size[0]
    assert len(views(img, CFG)) == (3 if tall else 1) == (ViewConfig().max_views() if tall else 1)  # the default: no contrast views
    assert len(views(img, CFG, CONTRAST)) == (9 if tall else 3) == (CONTRAST.max_views() if tall else 3)
    assert len(views(img, CFG, ViewConfig(turn_tall=False, contrast=True))) == 3


def test_a_tall_crop_is_also_read_turned_each_way() -> None:
    word = render_word("Hello", SIZE)
    # Written bottom to top, as on a vertical sign, and stored as an RGB PNG.
    tall = _roundtrip(word.transpose(Image.Transpose.ROTATE_90).convert("RGB"), "PNG")
    upright, ccw, cw = views(tall, CFG, ViewConfig(contrast=False))
    assert np.array_equal(upright, resize(tall, CFG))  # the first view is always the training one
    assert np.array_equal(cw, resize(word, CFG))  # turning it back restores the word exactly
    assert np.array_equal(ccw, resize(word.transpose(Image.Transpose.ROTATE_180), CFG))
    everything = views(tall, CFG, CONTRAST)
    assert [np.array_equal(a, b) for a, b in zip(everything[::3], (upright, ccw, cw))] == [True] * 3

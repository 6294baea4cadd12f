"""The synthetic renderer and shard writer: determinism, geometry, labels, fonts, resume.

Building a ``Renderer`` loads the word list and the background textures (seconds), so
the renderers are module-scoped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import string
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFont

from model import Charset
from model.charset import DEFAULT_CHARS
from model.training.data import load_any, load_lmdb, load_shards
from model.training.fonts import REQUIRED, FontFace, by_family, discover_fonts
from model.training.synth import RENDERER_VERSION, Renderer, SynthConfig, arc_mask, arc_text, render_dataset
from model.training.words import TextMix, TextSampler, parse_mix

CFG = SynthConfig(seed=0)


@pytest.fixture(scope="module")
def font_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fonts of this machine, discovered once and cached in ``fonts.json`` (may be empty)."""
    path = tmp_path_factory.mktemp("fonts") / "fonts.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a machine without fonts warns: tested separately
        discover_fonts(DEFAULT_CHARS, cache=path)
    return path


@pytest.fixture(scope="module")
def faces(font_cache: Path) -> list[FontFace]:
    return discover_fonts(DEFAULT_CHARS, cache=font_cache)


@pytest.fixture(scope="module")
def renderer(faces: list[FontFace]) -> Renderer:
    return Renderer(CFG, faces)


@pytest.fixture(scope="module")
def default_font_renderer() -> Renderer:
    """What a clean machine without fonts gets: Pillow's built-in font."""
    return Renderer(CFG, faces=[])


# -- fonts --------------------------------------------------------------------------------------


def test_every_discovered_font_loads_with_pil(faces: list[FontFace]) -> None:
    if not faces:
        pytest.skip("no fonts installed on this machine (the default-font path is tested below)")
    for face in faces:
        assert REQUIRED <= face.chars, face.path
        assert face.chars <= set(DEFAULT_CHARS + " ")  # the space too: phrases need it
        font = ImageFont.truetype(face.path, 24)
        left, top, right, bottom = font.getbbox("Ag0")
        assert right > left and bottom > top, face.path
    # Sorted by path, so font sampling is the same on every machine with the same fonts.
    assert [Path(f.path) for f in faces] == sorted(Path(f.path) for f in faces)


def test_no_fonts_warns_and_returns_empty(tmp_path: Path) -> None:
    (tmp_path / "broken.ttf").write_bytes(b"not a font")
    with pytest.warns(UserWarning, match="no system fonts found"):
        assert discover_fonts(DEFAULT_CHARS, dirs=(tmp_path, tmp_path / "missing")) == []


def test_font_and_texture_folders_can_be_named_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from model.training import synth

    dejavu = sorted(Path("/usr/share/fonts").rglob("DejaVuSans.ttf"))
    if not dejavu:
        pytest.skip("no DejaVu Sans installed")
    (tmp_path / "fonts").mkdir()
    shutil.copy(dejavu[0], tmp_path / "fonts" / "mine.ttf")
    monkeypatch.setenv("SAFL_FONT_DIRS", f"{tmp_path / 'missing'}:{tmp_path / 'fonts'}")
    assert [Path(f.path) for f in discover_fonts(DEFAULT_CHARS, families="all")] == [tmp_path / "fonts" / "mine.ttf"]  # those alone
    (tmp_path / "textures").mkdir()
    Image.new("L", (64, 48), 77).save(tmp_path / "textures" / "wall.png")
    monkeypatch.setenv("SAFL_BACKGROUND_DIRS", str(tmp_path / "textures"))
    synth._load_textures.cache_clear()
    try:
        (texture,) = synth._load_textures()
        assert texture.size == (64, 48) and texture.getpixel((0, 0)) == 77
    finally:
        synth._load_textures.cache_clear()  # later renders read the system's again


def test_by_family_groups_and_sorts() -> None:
    f = lambda p, fam: FontFace(p, fam, frozenset("a"))
    groups = by_family([f("/b1", "B"), f("/a1", "A"), f("/b2", "B")])
    assert [[x.path for x in g] for g in groups] == [["/a1"], ["/b1", "/b2"]]


# -- renderer -----------------------------------------------------------------------------------


def _assert_valid(img: np.ndarray, label: str, cfg: SynthConfig = CFG) -> None:
    assert img.shape == (cfg.height, cfg.width) and img.dtype == np.uint8
    assert 1 <= len(label) <= cfg.max_len
    assert all(c in cfg.charset for c in label), label
    assert Charset(cfg.charset).filter_label(label, cfg.max_len) == label
    assert img.std() > 1.0  # not a blank crop


def test_render_is_deterministic_per_index(renderer: Renderer) -> None:
    first = {i: renderer.render(i) for i in (0, 7, 3)}
    # Another order, after other draws: every index gives the same crop again.
    for i in (3, 11, 0, 7):
        img, label = renderer.render(i)
        if i in first:
            assert label == first[i][1]
            assert np.array_equal(img, first[i][0])


def test_different_seeds_differ(renderer: Renderer) -> None:
    other = copy.copy(renderer)  # same fonts, textures and word list; only the seed differs
    other.cfg = dataclasses.replace(renderer.cfg, seed=1)
    a = [renderer.render(i) for i in range(12)]
    b = [other.render(i) for i in range(12)]
    assert sum(x[1] != y[1] for x, y in zip(a, b)) >= 8
    assert all(not np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert len({lab for _, lab in a}) >= 8  # and indices differ from each other


def test_output_matches_model_input_and_labels_are_valid(renderer: Renderer) -> None:
    labels = []
    for i in range(60):
        img, label = renderer.render(i)
        _assert_valid(img, label)
        labels.append(label)
    # The text mix holds more than plain lowercase words.
    joined = "".join(labels)
    assert any(c.isupper() for c in joined) and any(c.isdigit() for c in joined)


#: Renderer 4's grey crops 0-15 of seed 5 in Pillow's built-in font without textures, stored
#: before the renderer learnt colour (renderer 3 draws the same images).
STORED_GREY = Path(__file__).parent / "fixtures" / "synth_grey_r4.npz"


def test_grey_crops_are_the_stored_renderer_4_crops() -> None:
    stored = np.load(STORED_GREY)
    r = Renderer(SynthConfig(seed=5), faces=[])
    r.textures = ()  # the stored crops were drawn on a machine without wallpapers
    rendered = [r.render_with_points(i) for i in range(len(stored["images"]))]
    assert [t for _, t, _ in rendered] == list(stored["labels"])
    for i, (img, _, points) in enumerate(rendered):
        assert np.array_equal(img, stored["images"][i]), f"crop {i} differs from renderer 4's"
        assert np.array_equal(points, stored["points"][i], equal_nan=True), f"crop {i}'s points moved"


def test_colour_crops_are_the_grey_crops_painted(renderer: Renderer) -> None:
    colour = copy.copy(renderer)  # same fonts, textures and word list
    colour.cfg = dataclasses.replace(renderer.cfg, channels=3)
    coloured = 0
    for i in range(24):
        _, grey_text, grey_points = renderer.render_with_points(i)
        img, text, points = colour.render_with_points(i)
        assert img.shape == (CFG.height, CFG.width, 3) and img.dtype == np.uint8
        # Colours come from their own random stream: same text, same geometry, same points.
        assert text == grey_text and np.array_equal(points, grey_points, equal_nan=True)
        coloured += np.abs(img.astype(int) - img.mean(axis=-1, keepdims=True)).max() > 20
    assert coloured >= 16  # grey is one colour among others (colours.tinted's p_grey)
    assert np.array_equal(colour.render(5)[0], colour.render(5)[0])


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_weak_luma_crops_hold_chroma_contrast_but_little_luma_contrast(faces: list[FontFace]) -> None:
    # Flat backgrounds and no degradation: the crop holds the background and the text's colours.
    plain = dict(p_texture=0, p_gradient=0, p_shadow=0, p_outline=0, p_underline=0, p_blur=0, p_lowres=0, p_noise=0, p_jpeg=0, p_low_contrast=0)
    weak = Renderer(SynthConfig(seed=2, channels=3, p_weak_luma=1.0, **plain), faces)
    ordinary = Renderer(SynthConfig(seed=2, channels=3, p_weak_luma=0.0, **plain), faces)
    for i in range(12):
        img, ordinary_img = weak.render(i)[0], ordinary.render(i)[0]
        y = _luma(img)
        chroma = img - y[..., None]
        # Background (the most common colour) against the pixel of chroma farthest from it.
        flat = img.reshape(-1, 3)
        values, counts = np.unique(flat, axis=0, return_counts=True)
        background = values[counts.argmax()]
        far = np.linalg.norm(chroma.reshape(-1, 3) - (background - _luma(background)), axis=1)
        assert far.max() > 60, i  # the text stands out in colour ...
        assert np.ptp(y) < 60, i  # ... and hardly in grey (24 levels, resampling aside)
        assert np.ptp(_luma(ordinary_img)) > 50, i  # ordinary crops keep the grey crop's contrast


def _ink_rows(mask: np.ndarray, cols: slice) -> float:
    """Mean row of the ink in a band of columns."""
    rows, _ = np.nonzero(mask[:, cols] > 127)
    return float(rows.mean())


def _pieces(mask: np.ndarray) -> list[np.ndarray]:
    """The ink of ``mask`` split at empty columns, left to right (each piece cropped to its rows)."""
    cols = (mask > 127).any(axis=0)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], cols.astype(int), [0]))))
    out = []
    for a, b in zip(edges[::2], edges[1::2]):
        piece = mask[:, a:b]
        rows = np.flatnonzero((piece > 127).any(axis=1))
        out.append(piece[rows[0] : rows[-1] + 1])
    return out


def _lean(piece: np.ndarray) -> float:
    """How far right the ink's top quarter sits from its bottom quarter, in pixels."""
    q = max(1, piece.shape[0] // 4)

    def centre(band: np.ndarray) -> float:
        return float(np.nonzero(band > 127)[1].mean())

    return centre(piece[:q]) - centre(piece[-q:])


def test_arc_mask_bends_the_line_and_turns_the_glyphs() -> None:
    font = ImageFont.load_default(40)
    flat = np.asarray(arc_mask("HORIZONTAL", font, 0))
    arch = np.asarray(arc_mask("HORIZONTAL", font, 90))
    valley = np.asarray(arc_mask("HORIZONTAL", font, -90))
    # Straight: as wide as the text and one line high.
    assert flat.shape[1] == pytest.approx(font.getlength("HORIZONTAL"), rel=0.1) and flat.shape[0] < 45
    # An arch: the middle highest, both ends lower; a valley the other way; both taller than a line.
    for bent, middle_higher in ((arch, True), (valley, False)):
        w = bent.shape[1]
        ends = (_ink_rows(bent, slice(0, w // 8)) + _ink_rows(bent, slice(w - w // 8, w))) / 2
        middle = _ink_rows(bent, slice(w // 2 - w // 16, w // 2 + w // 16))
        assert (middle < ends - 10) if middle_higher else (middle > ends + 10)
        assert bent.shape[0] > 2 * flat.shape[0]
    # Each glyph is turned with the arc: at the right end of an arch the letters lean right
    # (clockwise), at the right end of a valley left, and the left ends the other way.
    for degrees, right_leans in ((90, 1), (-90, -1)):
        pieces = _pieces(np.asarray(arc_mask("I    I    I    I    I", font, degrees)))
        assert len(pieces) == 5
        assert np.sign(_lean(pieces[-1])) == right_leans and np.sign(_lean(pieces[0])) == -right_leans
        assert abs(_lean(pieces[-1])) > 3 and abs(_lean(pieces[2])) < 2  # the middle one stands upright
    with pytest.raises(ValueError, match="360"):
        arc_mask("A", font, 400)
    with pytest.raises(ValueError, match="no ink"):
        arc_mask("   ", font, 30)


def test_arc_crops_are_valid_and_deterministic(faces: list[FontFace], monkeypatch: pytest.MonkeyPatch) -> None:
    import model.training.synth as synth

    spans: list[float] = []

    def spy(text: str, font: ImageFont.FreeTypeFont, degrees: float, stroke: int = 0, points_per_edge: int = 10):
        spans.append(degrees)
        return arc_text(text, font, degrees, stroke, points_per_edge)

    monkeypatch.setattr(synth, "arc_text", spy)
    arcs = Renderer(dataclasses.replace(CFG, p_arc=1.0, p_curve=0.0), faces)
    for i in range(12):
        img, label = arcs.render(i)
        _assert_valid(img, label)
        assert np.array_equal(img, arcs.render(i)[0])
    # Every crop was set along an arc of 20-120 degrees, arches and valleys both.
    assert len(spans) >= 24 and all(20 <= abs(d) <= 120 for d in spans) and min(spans) < 0 < max(spans)
    spans.clear()
    plain = Renderer(dataclasses.replace(CFG, p_arc=0.0), faces)
    for i in range(12):
        plain.render(i)
    assert spans == []


def test_default_font_path(default_font_renderer: Renderer, renderer: Renderer) -> None:
    assert default_font_renderer.families == []
    for i in range(20):
        img, label = default_font_renderer.render(i)
        _assert_valid(img, label)
        assert np.array_equal(img, default_font_renderer.render(i)[0])


def test_text_sampler_respects_max_len_and_charset(renderer: Renderer) -> None:
    lexicon = renderer.sampler.lexicon
    assert len(lexicon.words) > 10000 and lexicon.words[0] in ("the", "The")
    rng = random.Random(0)
    for charset, max_len in ((DEFAULT_CHARS, 4), (DEFAULT_CHARS, 25), (string.ascii_lowercase + string.digits, 10)):
        sampler = TextSampler(charset, max_len, lexicon)
        for _ in range(300):
            text = sampler.sample(rng)
            assert 1 <= len(text) <= max_len
            assert all(c in charset for c in text), text


def test_text_mix_sets_the_share_of_long_tokens(renderer: Renderer) -> None:
    lexicon = renderer.sampler.lexicon
    rng = random.Random(1)

    def long_share(mix: TextMix) -> float:
        sampler = TextSampler(DEFAULT_CHARS, 25, lexicon, mix)
        return sum(len(sampler.sample(rng)) >= 13 for _ in range(2000)) / 2000

    only_long = dataclasses.replace(TextMix(**{k: 0.0 for k in dataclasses.asdict(TextMix())}), long_token=1.0)
    assert long_share(only_long) == 1.0
    assert long_share(parse_mix(["long_token=0.3"])) > long_share(TextMix()) + 0.1


def test_safl_synth_mix_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model.training.cli import main

    assert main(["synth", "--out", str(tmp_path / "s"), "--count", "1", "--mix", "code=1", "--mix", "code=2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "safl synth: --mix code given more than once" and not (tmp_path / "s").exists()


def test_safl_synth_renders_at_another_width_and_a_model_that_wide_trains_on_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model.preprocess import PreprocessConfig
    from model.training.cli import main

    out = tmp_path / "wide"
    assert main(["synth", "--out", str(out), "--count", "4", "--workers", "1", "--shard-size", "4", "--width", "160", "--no-progress"]) == 0
    assert np.load(out / "shard-00000.npy").shape == (4, 32, 160)
    assert load_any(out, PreprocessConfig(width=160)).images.shape == (4, 32, 160)
    with pytest.raises(ValueError, match="rendered at 32x160"):
        load_any(out, PreprocessConfig())  # a 128-wide model refuses them
    assert main(["synth", "--out", str(tmp_path / "bad"), "--count", "1", "--width", "130"]) == 2
    assert "multiple of 4" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_safl_synth_renders_colour_shards_a_colour_model_loads(tmp_path: Path) -> None:
    from model.preprocess import PreprocessConfig
    from model.training.cli import main

    out = tmp_path / "colour"
    assert main(["synth", "--out", str(out), "--count", "4", "--workers", "1", "--shard-size", "4", "--channels", "3", "--no-progress"]) == 0
    assert np.load(out / "shard-00000.npy").shape == (4, 32, 128, 3)
    assert json.loads((out / "meta.json").read_text())["channels"] == 3
    assert load_any(out, PreprocessConfig(channels=3)).images.shape == (4, 32, 128, 3)
    with pytest.raises(ValueError, match="32x128x3"):
        load_any(out, PreprocessConfig())  # a grey model refuses them


def test_parse_mix_names_the_problem() -> None:
    assert parse_mix([]) == TextMix()
    assert parse_mix(["long_token=0.15", "number=0"]).long_token == 0.15
    for bad, says in (
        (["shout=1"], "KIND one of word_by_frequency"),
        (["long_token"], "KIND=WEIGHT"),
        (["long_token=-1"], ">= 0"),
        (["code=nan"], ">= 0"),
        (["code=inf"], ">= 0"),
        (["code=1", "code=2"], "more than once"),
        (["code=1e308", "number=1e308"], "too large"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_mix(bad)
    with pytest.raises(ValueError, match="at least one weight"):
        parse_mix([f"{k}=0" for k in dataclasses.asdict(TextMix())])


# -- shards -------------------------------------------------------------------------------------


def _prepare(out: Path, font_cache: Path) -> None:
    # The data set records its fonts in out/fonts.json; reuse this module's discovery.
    out.mkdir(parents=True)
    shutil.copyfile(font_cache, out / "fonts.json")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, font_cache: Path) -> tuple[Path, dict]:
    """40 crops in shards of 16, rendered once by a worker process (read-only for tests)."""
    out = tmp_path_factory.mktemp("render") / "synth"
    _prepare(out, font_cache)
    summary = render_dataset(out, 40, CFG, workers=1, shard_size=16, progress=False)
    return out, summary


def test_render_dataset_writes_shards(rendered: tuple[Path, dict], renderer: Renderer) -> None:
    out, summary = rendered
    assert summary["rendered"] == 40
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fonts.json", "meta.json"] + [f"shard-0000{k}.{ext}" for k in range(3) for ext in ("npy", "pts.npy", "txt")]
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["count"], meta["shard_size"], meta["seed"], meta["height"], meta["width"]) == (40, 16, 0, 32, 128)

    ds = load_shards(out)
    assert ds.images.shape == (40, 32, 128) and len(ds.labels) == 40
    assert [len(np.load(out / f"shard-0000{k}.npy")) for k in range(3)] == [16, 16, 8]
    for img, label in zip(ds.images, ds.labels):
        _assert_valid(img, label)
    # Worker processes produce exactly what an in-process renderer gives for each index.
    for i in (0, 15, 16, 39):
        img, label, points = renderer.render_with_points(i)
        assert ds.labels[i] == label and np.array_equal(ds.images[i], img)
        np.testing.assert_array_equal(ds.points[i], points.astype(np.float16))
    assert load_any(out, CFG.preprocess).labels == ds.labels


def test_render_dataset_resumes(rendered: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "synth"
    shutil.copytree(rendered[0], out)
    original = load_shards(out)
    meta = json.loads((out / "meta.json").read_text())
    del meta["text_mix"]  # rendered before the mix was recorded (with the default mix)
    (out / "meta.json").write_text(json.dumps(meta))
    # Interrupted run: shard 2 missing, a stray temp file, shard 0 finished (marked so we can tell).
    marked = 255 - np.load(out / "shard-00000.npy")
    np.save(out / "shard-00000.npy", marked)
    (out / "shard-00002.npy").unlink()
    (out / "shard-00002.txt").unlink()
    np.save(out / "shard-00002.npy.tmp.npy", np.zeros((3, 32, 128), np.uint8))
    summary = render_dataset(out, 40, CFG, workers=1, shard_size=16, progress=False)
    assert summary["rendered"] == 8  # only the missing shard
    again = load_shards(out)
    assert np.array_equal(again.images[:16], marked)  # finished shard kept, not re-rendered
    assert np.array_equal(again.images[16:], original.images[16:]) and again.labels == original.labels
    assert not (out / "shard-00002.npy.tmp.npy").exists()


def test_render_dataset_refuses_other_settings(tmp_path: Path, font_cache: Path) -> None:
    out = tmp_path / "synth"
    _prepare(out, font_cache)
    meta = {"renderer_version": 1, "count": 10, "shard_size": 16, "format": "npy", "fonts": 0, **dataclasses.asdict(SynthConfig(seed=5))}
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="other settings"):
        render_dataset(out, 10, CFG, workers=1, shard_size=16, progress=False)
    meta = {**meta, "renderer_version": RENDERER_VERSION, "seed": CFG.seed, "fonts": len(discover_fonts(DEFAULT_CHARS, cache=out / "fonts.json"))}
    (out / "meta.json").write_text(json.dumps(meta))
    assert render_dataset(out, 10, CFG, workers=1, shard_size=16, progress=False)["rendered"] == 10  # the same settings: accepted
    before_colour = {k: v for k, v in meta.items() if k != "p_weak_luma"}
    (out / "meta.json").write_text(json.dumps(before_colour))
    assert render_dataset(out, 10, CFG, workers=1, shard_size=16, progress=False)["rendered"] == 0  # a grey set from before colour: resumed
    (out / "meta.json").write_text(json.dumps({**meta, "text_mix": {**meta["text_mix"], "long_token": 0.5}}))
    with pytest.raises(SystemExit, match="other settings"):  # another mix of label kinds
        render_dataset(out, 10, CFG, workers=1, shard_size=16, progress=False)


def test_render_dataset_lmdb(tmp_path: Path, font_cache: Path, renderer: Renderer) -> None:
    out = tmp_path / "lmdb"
    _prepare(out, font_cache)
    render_dataset(out, 20, CFG, workers=1, shard_size=16, fmt="lmdb", progress=False)
    assert (out / "data.mdb").is_file()
    ds = load_lmdb(out, CFG.preprocess)
    assert ds.images.shape == (20, 32, 128) and len(ds.labels) == 20
    for i in (0, 17, 19):
        img, label = renderer.render(i)
        assert ds.labels[i] == label and np.array_equal(ds.images[i], img)  # PNG is lossless
    via_any = load_any(out, CFG.preprocess)
    assert via_any.labels == ds.labels


def test_phrases_hold_single_spaces_between_words_and_only_with_a_space_in_the_charset(renderer: Renderer) -> None:
    rng = random.Random(3)
    phrases = TextSampler(DEFAULT_CHARS + " ", 25, renderer.sampler.lexicon, TextMix(**{k: 0.0 for k in dataclasses.asdict(TextMix())} | {"phrase": 1.0}))
    texts = [phrases.sample(rng) for _ in range(200)]
    assert all(len(t) <= 25 and t == " ".join(t.split()) for t in texts)
    assert sum(" " in t for t in texts) > 190  # two or three words (a rare fallback aside)
    # The default mix draws no phrase, and a word reader's sampler never returns a space.
    words = TextSampler(DEFAULT_CHARS, 25, renderer.sampler.lexicon, TextMix())
    assert "phrase" not in words.kinds and not any(" " in words.sample(rng) for _ in range(300))
    # The space in the charset changes nothing but the phrases: the other kinds draw the same strings.
    spaced = TextSampler(DEFAULT_CHARS + " ", 25, renderer.sampler.lexicon, TextMix())
    a, b = random.Random(6), random.Random(6)
    assert [words.sample(a) for _ in range(500)] == [spaced.sample(b) for _ in range(500)]


def test_phrases_from_a_charset_without_the_space_are_refused(renderer: Renderer) -> None:
    # Every phrase would be refused by the charset check and silently replaced by another kind:
    # stop 34 rendered 300k crops with --mix phrase=0.1 and not one phrase before this check.
    with pytest.raises(ValueError, match="space"):
        TextSampler(DEFAULT_CHARS, 25, renderer.sampler.lexicon, TextMix(phrase=0.1))


def test_safl_synth_renders_phrases_when_the_mix_asks_for_them(tmp_path) -> None:
    from model.training.cli import main

    out = tmp_path / "phrases"
    assert main(["synth", "--out", str(out), "--count", "60", "--seed", "2", "--workers", "1", "--mix", "phrase=100", "--no-progress"]) == 0
    labels = (out / "shard-00000.txt").read_text(encoding="utf-8").splitlines()
    assert len(labels) == 60 and sum(" " in t for t in labels) > 50
    assert json.loads((out / "meta.json").read_text())["charset"].endswith(" ")


def test_a_model_reading_the_space_is_streamed_phrases() -> None:
    from model.training.words import SPACED_PHRASE_WEIGHT

    assert TextMix.for_charset(DEFAULT_CHARS) == TextMix()
    assert TextMix.for_charset(DEFAULT_CHARS + " ") == TextMix(phrase=SPACED_PHRASE_WEIGHT) and SPACED_PHRASE_WEIGHT > 0

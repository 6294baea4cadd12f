"""Offline synthetic word-crop renderer and shard writer.

Each crop is rendered from its own seed (``seed``, ``index``), so the data set is the
same on any machine and in any number of worker processes, and an interrupted
render resumes shard by shard. A rendered crop goes through
``model.preprocess.resize``, the code path serving uses, before it is stored.

Shard layout (``--format npy``, the default: no decoding cost at training time)::

    out/meta.json              seed, count, geometry, charset
    out/shard-00000.npy        uint8 [N, H, W] (or [N, H, W, 3])
    out/shard-00000.txt        N labels, one per line
    out/shard-00000.pts.npy    float16 [N, F, 2]: where each crop's text edges lie (renderer 4;
                               ``Renderer.render_with_points``), the rectifier's point targets

``--format lmdb`` writes the STR community's LMDB layout instead (``image-%09d`` PNG
bytes, ``label-%09d``, ``num-samples``).

Colour (``SynthConfig.channels == 3``, ``safl synth --channels 3``): RGB crops, shards of
``[N, H, W, 3]``, for a model grown to read colour (``grow --channels 3``). A colour crop is
the grey crop of the same seed painted: the same text, font, geometry, fiducial points and
degradations, every colour drawn from a second random stream of its own (``colours``), so
the grey data set (the default) renders exactly as before, image for image. An ordinary
colour crop keeps the grey crop's luma (``colours.tinted``), so it is no harder in grey; a
share of them (``p_weak_luma``) have text and background of nearly the same luma and
clearly different hue (``colours.weak_luma_pair``), with outlines and shadows in further
such colours: the crops a grey reader cannot read.
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing as mp
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..charset import DEFAULT_CHARS
from ..preprocess import PreprocessConfig, resize
from .colours import RGB, colourise, tinted, weak_luma_pair, weak_luma_partner
from .fonts import FontFace, by_family, discover_fonts, search_dirs
from .words import Lexicon, TextMix, TextSampler

RENDERER_VERSION = (
    4  # 2: tight crops more often, weak contrast, long tokens (words.TextMix.long_token); 3: text set along arcs (p_arc); 4: fiducial points (same images as 3)
)
BACKGROUND_DIRS = (Path("/usr/share/backgrounds"), Path("/usr/share/images/desktop-base"), Path("/usr/share/wallpapers"))
#: Folders of textures instead of ``BACKGROUND_DIRS`` (``os.pathsep``-separated), as ``SAFL_FONT_DIRS`` for fonts.
BACKGROUND_DIRS_ENV = "SAFL_BACKGROUND_DIRS"


@dataclass(frozen=True)
class SynthConfig:
    """What to render. Probabilities are per crop."""

    seed: int = 0
    charset: str = DEFAULT_CHARS
    max_len: int = 25
    height: int = 32
    width: int = 128
    channels: int = 1
    min_font_px: int = 22
    max_font_px: int = 60
    p_texture: float = 0.25
    p_gradient: float = 0.25
    p_shadow: float = 0.1
    p_outline: float = 0.1
    p_underline: float = 0.04
    p_rotate: float = 0.35
    p_perspective: float = 0.25
    p_curve: float = 0.12  # vertical strips shifted along a parabola (glyphs stay upright)
    p_arc: float = 0.1  # of the crops not bent by p_curve (so 8.8 % of all): glyphs set along a circular arc and turned with it (arc_mask)
    p_blur: float = 0.3
    p_lowres: float = 0.2
    p_noise: float = 0.3
    p_jpeg: float = 0.2
    p_tight: float = 0.4  # margins within a few % of the text height (cut at the ink)
    p_low_contrast: float = 0.15  # text only 20-60 grey levels from its background
    #: Colour crops only (``channels == 3``): text, outline and shadow of nearly the background's
    #: luma and clearly another hue (``colours.weak_luma_pair``); the background's light and
    #: shade flattened towards its mean, so the crop holds little luma contrast anywhere.
    p_weak_luma: float = 0.3
    text_mix: TextMix = field(default_factory=TextMix)  # share of each kind of label string
    #: Fiducial points stored with each crop (``shard-*.pts.npy``): half along the text's top
    #: edge, half along its bottom edge, as the model's TPS rectifier orders them.
    fiducial_points: int = 20

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(self.height, self.width, self.channels)


#: Every extra off (texture, gradient, shadow, outline, underline, rotation, perspective,
#: parabola, arc, blur, low resolution, noise, JPEG, weak contrast): a flat crop of the text,
#: for pictures, examples and tests that switch on the one thing they show.
PLAIN = SynthConfig(
    p_texture=0.0,
    p_gradient=0.0,
    p_shadow=0.0,
    p_outline=0.0,
    p_underline=0.0,
    p_rotate=0.0,
    p_perspective=0.0,
    p_curve=0.0,
    p_arc=0.0,
    p_blur=0.0,
    p_lowres=0.0,
    p_noise=0.0,
    p_jpeg=0.0,
    p_low_contrast=0.0,
)


def _perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    # PIL's PERSPECTIVE maps output (x, y) to input; solve the 8 coefficients from 4 pairs.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)).tolist()


def _rotated_points(points: np.ndarray, degrees: float, size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Where ``Image.rotate(degrees, expand=True)`` moves ``points`` (pixel x, y; ``[..., 2]``)
    of an image of ``size`` that becomes ``new_size``: counter-clockwise about the centre."""
    t = math.radians(degrees)
    x, y = points[..., 0] - size[0] / 2, points[..., 1] - size[1] / 2
    return np.stack([math.cos(t) * x + math.sin(t) * y + new_size[0] / 2, -math.sin(t) * x + math.cos(t) * y + new_size[1] / 2], axis=-1)


@functools.lru_cache(maxsize=1)
def _load_textures(max_side: int = 480) -> tuple[Image.Image, ...]:
    # Cached per process (read-only afterwards): decoding the 4096-px wallpapers takes
    # seconds, and forked render workers inherit the parent's copy.
    textures = []
    for d in search_dirs(BACKGROUND_DIRS_ENV, BACKGROUND_DIRS):
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
                continue
            try:
                with Image.open(p) as im:
                    im.draft("L", (max_side, max_side))
                    im = im.convert("L")
                    im.thumbnail((max_side, max_side))
                    textures.append(im.copy())
            except (OSError, ValueError):
                continue
    return tuple(textures)


def arc_text(text: str, font: ImageFont.FreeTypeFont, degrees: float, stroke: int = 0, points_per_edge: int = 10) -> tuple[Image.Image, np.ndarray]:
    """``text`` set along a circular arc that spans ``degrees`` of the circle, each glyph
    turned to the arc's tangent: the curved words of round signs, logos and stamps
    (CUTE80, Risnumawan et al. 2014). ``degrees`` > 0 bends the line into an arch (the
    middle highest), < 0 into a valley, 0 leaves it straight; ``stroke`` outlines the
    glyphs by that many pixels.

    Returns an 8-bit mask (mode ``L``, 255 on the ink) cropped to the ink, and the text's
    edges in that mask's pixel coordinates: float64 ``[2, points_per_edge, 2]`` (x, y),
    the top edge then the bottom edge, each left to right, spaced evenly along the arc at
    the string's ink top and bottom (``font.getbbox``). Raises ``ValueError`` for
    ``|degrees|`` > 360 or a text with no ink.
    """
    if abs(degrees) > 360:
        raise ValueError(f"an arc spans at most 360 degrees, not {degrees}")
    advances = [font.getlength(ch) + 2 * stroke for ch in text]
    length = sum(advances)
    size = font.size + 2 * stroke
    radius = length / math.radians(abs(degrees)) if degrees else 0.0
    sign = 1 if degrees >= 0 else -1
    pad = size
    half = math.radians(abs(degrees)) / 2
    half_width = radius * math.sin(min(half, math.pi / 2)) if radius else length / 2
    sagitta = radius * (1 - math.cos(half))  # how far the ends drop below (rise above) the middle
    canvas = Image.new("L", (int(2 * half_width + 4 * pad), int(sagitta + 4 * pad)), 0)
    centre_x, centre_y = canvas.width / 2, 2 * pad if sign > 0 else canvas.height - 2 * pad
    x = -length / 2
    for ch, adv in zip(text, advances):
        glyph = Image.new("L", (int(adv + 2 * pad), 3 * size), 0)
        ImageDraw.Draw(glyph).text((pad + stroke, size), ch, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
        mid = x + adv / 2
        if radius:
            # The glyph's centre on the circle, its baseline along the tangent.
            theta = mid / radius
            gx, gy = centre_x + radius * math.sin(theta), centre_y + sign * radius * (1 - math.cos(theta))
            glyph = glyph.rotate(-sign * math.degrees(theta), resample=Image.Resampling.BICUBIC, expand=True)
        else:
            gx, gy = centre_x + mid, centre_y
        canvas.paste(Image.new("L", glyph.size, 255), (int(round(gx - glyph.width / 2)), int(round(gy - glyph.height / 2))), glyph)
        x += adv
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"no ink drawn for {text!r}")
    # A glyph's image is centred 1.5 * size below its top, and drawn with its ascender line
    # at ``size``: the string's ink spans ``top - size / 2`` to ``bottom - size / 2`` about
    # the circle through the glyph centres (positive: away from the arch's top).
    _, top, _, bottom = font.getbbox(text, stroke_width=stroke)
    arc_len = np.linspace(-length / 2, length / 2, points_per_edge)
    edges = np.array([[_arc_point(a, v - size / 2, radius, sign, centre_x, centre_y) for a in arc_len] for v in (top, bottom)], dtype=np.float64) - np.array(
        [box[0], box[1]], dtype=np.float64
    )
    return canvas.crop(box), edges


def _arc_point(along: float, down: float, radius: float, sign: int, centre_x: float, centre_y: float) -> tuple[float, float]:
    """Where a point ``along`` the arc's length from its middle, ``down`` from the line
    through the glyph centres (glyph frame: positive is down the glyph), lands in
    ``arc_text``'s canvas."""
    if not radius:
        return centre_x + along, centre_y + down
    theta = along / radius
    # The circle's centre lies below an arch (sign +1) and above a valley (sign -1); the
    # glyph's "down" points towards it for an arch and away from it for a valley.
    r = radius - sign * down
    return centre_x + r * math.sin(theta), centre_y + sign * (radius - r * math.cos(theta))


def arc_mask(text: str, font: ImageFont.FreeTypeFont, degrees: float, stroke: int = 0) -> Image.Image:
    """``arc_text``'s mask alone."""
    return arc_text(text, font, degrees, stroke)[0]


class Renderer:
    """Renders (image, label) pairs; one instance per worker process."""

    def __init__(self, cfg: SynthConfig, faces: list[FontFace] | None = None, font_cache: Path | None = None) -> None:
        self.cfg = cfg
        faces = discover_fonts(cfg.charset, cache=font_cache) if faces is None else faces
        self.families = by_family(faces)
        self.sampler = TextSampler(cfg.charset, cfg.max_len, Lexicon(), cfg.text_mix)
        self.textures = _load_textures()
        self._fonts: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}

    def _font(self, face: FontFace | None, size: int) -> ImageFont.FreeTypeFont:
        key = (face.path if face else "", size)
        font = self._fonts.get(key)
        if font is None:
            if len(self._fonts) > 2000:
                self._fonts.clear()
            font = ImageFont.truetype(face.path, size) if face else ImageFont.load_default(size)
            self._fonts[key] = font
        return font

    def _pick_face(self, text: str, rng: random.Random) -> FontFace | None:
        if not self.families:
            return None
        need = set(text)
        for _ in range(10):
            face = rng.choice(rng.choice(self.families))
            if need <= face.chars:
                return face
        return None

    def render(self, index: int) -> tuple[np.ndarray, str]:
        """Crop number ``index`` of this config's data set, already resized for the model."""
        image, text, _ = self.render_with_points(index)
        return image, text

    def render_with_points(self, index: int) -> tuple[np.ndarray, str, np.ndarray]:
        """``render``, and where the text's edges lie in the crop: float32
        ``[cfg.fiducial_points, 2]`` (x, y) in the model's normalised coordinates (-1 is the
        crop's left / top border, +1 its right / bottom one), evenly spaced along the top edge
        left to right, then along the bottom edge. These are the fiducial points that a
        perfect TPS rectifier (``model.rectify``) would predict for the crop: it maps them onto
        the flat output's top and bottom borders, which straightens the text. The points follow
        every geometric step of the drawing (arc, parabola, perspective, rotation, stretching
        to the model's size); margins, blur and noise do not move them. All NaN when the
        text's edges fold (x not increasing along an edge)."""
        for attempt in range(5):
            rng = random.Random(f"{self.cfg.seed}:{index}:{attempt}")
            # Colours come from a stream of their own: the grey draws, and so the geometry, stay the grey crop's.
            tint = random.Random(f"{self.cfg.seed}:{index}:{attempt}:colour") if self.cfg.channels == 3 else None
            text = self.sampler.sample(rng)
            face = self._pick_face(text, rng)
            if face is None and self.families:
                text = "".join(c for c in text if c.isalnum()) or "a"
                face = self._pick_face(text, rng)
            try:
                img, edges = self._draw(text, self._font(face, rng.randint(self.cfg.min_font_px, self.cfg.max_font_px)), rng, tint)
            except (ValueError, ZeroDivisionError, OSError, np.linalg.LinAlgError):
                continue  # a degenerate geometry for this draw: redraw with the next sub-seed
            # Stretched to the model's size (preprocess.resize): pixel x in [0, width] → [-1, 1].
            points = edges.reshape(-1, 2) / np.array([img.width, img.height], dtype=np.float64) * 2 - 1
            if not (np.diff(edges[..., 0], axis=1) > 0).all():
                # A folded edge (a short word on a tight arc: its inner edge passes the
                # circle's centre) is no target a TPS can meet: the crop carries no points.
                points = np.full_like(points, np.nan)
            return resize(img, self.cfg.preprocess), text, points.astype(np.float32)
        raise RuntimeError(f"could not render crop {index}")

    # -- drawing ---------------------------------------------------------------------

    def _background(self, size: tuple[int, int], level: int, rng: random.Random) -> Image.Image:
        w, h = size
        c = self.cfg
        r = rng.random()
        if self.textures and r < c.p_texture:
            tex = rng.choice(self.textures)
            scale = max(w / tex.width, h / tex.height, rng.uniform(0.3, 1.0))
            if scale > 1.0 or rng.random() < 0.5:
                tex = tex.resize((max(w, int(tex.width * scale)), max(h, int(tex.height * scale))), Image.Resampling.BILINEAR)
            x0, y0 = rng.randint(0, tex.width - w), rng.randint(0, tex.height - h)
            patch = tex.crop((x0, y0, x0 + w, y0 + h))
            # Flatten the texture towards a level so text stays legible on most crops.
            return Image.blend(Image.new("L", size, level), patch, rng.uniform(0.2, 0.8))
        if r < c.p_texture + c.p_gradient:
            a, b = level, int(np.clip(level + rng.randint(-90, 90), 0, 255))
            ramp = np.linspace(a, b, w if rng.random() < 0.6 else h, dtype=np.float32)
            arr = np.broadcast_to(ramp[None, :], (h, w)) if ramp.shape[0] == w else np.broadcast_to(ramp[:, None], (h, w))
            return Image.fromarray(arr.astype(np.uint8))
        if r < c.p_texture + c.p_gradient + 0.15:
            # Smooth blotches: low-resolution noise upsampled.
            np_rng = np.random.default_rng(rng.getrandbits(32))
            small = np_rng.normal(level, rng.uniform(5, 35), size=(rng.randint(2, 6), rng.randint(2, 12)))
            return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        return Image.new("L", size, level)

    def _draw(self, text: str, font: ImageFont.FreeTypeFont, rng: random.Random, tint: random.Random | None = None) -> tuple[Image.Image, np.ndarray]:
        """The drawn crop (mode ``L``, or ``RGB`` with ``tint``, the colours' random stream) and
        its text's edges in its pixel coordinates (``[2, K, 2]``, see ``arc_text``). Every draw
        from ``rng`` is made in the order renderer v3 made it, so a seed gives v3's images in
        grey, and the same geometry in colour."""
        c = self.cfg
        k = c.fiducial_points // 2
        size_px = font.size
        stroke = rng.randint(1, max(1, size_px // 12)) if rng.random() < c.p_outline else 0
        spacing = rng.choice((0, 0, 0, 0, 0, 0, 1, 2, 4)) * max(1, size_px // 16)
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        if spacing:
            widths = [font.getlength(ch) + spacing for ch in text]
            left, top, _, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
            right = left + int(sum(widths) - spacing) + 2 * stroke + 2
        else:
            left, top, right, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
        tw, th = max(1, right - left), max(1, bottom - top)
        # Tight to loose crops; a slightly negative margin clips the glyph edges as real
        # detectors do. Crops cut at the ink are drawn often on purpose: the model read 75 %
        # of clean words cropped tight against 92 % with a 40 % margin.
        tight = rng.random() < c.p_tight
        ml, mr = (int(th * (rng.uniform(-0.05, 0.08) if tight else rng.uniform(0.0, 0.6))) for _ in range(2))
        mt, mb = (int(th * (rng.uniform(-0.06, 0.06) if tight else rng.uniform(-0.05, 0.45))) for _ in range(2))
        curve = rng.random() < c.p_curve
        amp = int(th * rng.uniform(0.15, 0.6)) if curve else 0
        # An arch twice as often as a valley, spanning 20-120 degrees of the circle.
        arc = 0.0 if curve or rng.random() >= c.p_arc else rng.choice((1, 1, -1)) * rng.uniform(20, 120)
        # Arc crops are plain: no outline (stroke is ignored below), no letter spacing, no underline.
        arc_ink, edges = arc_text(text, font, arc, points_per_edge=k) if arc else (None, None)
        if arc_ink is not None:
            w, h = arc_ink.width + ml + mr, arc_ink.height + mt + mb
            edges = edges + np.array([ml, mt], dtype=np.float64)
        else:
            w, h = tw + ml + mr, th + mt + mb + 2 * amp
            xs = np.linspace(ml, ml + tw, k)
            edges = np.stack([np.stack([xs, np.full(k, y, dtype=np.float64)], axis=1) for y in (mt + amp, mt + amp + th)])
        w, h = max(w, 4), max(h, 4)
        origin = (ml - left, mt + amp - top)

        def ink(offset: tuple[int, int] = (0, 0), stroke_w: int = stroke) -> Image.Image:
            m = Image.new("L", (w, h), 0)
            if arc_ink is not None:
                m.paste(arc_ink, (ml + offset[0], mt + offset[1]))
            else:
                self._text(ImageDraw.Draw(m), (origin[0] + offset[0], origin[1] + offset[1]), text, font, stroke_w, spacing, 255)
            return m

        mask = ink()
        if rng.random() < c.p_underline and arc_ink is None:
            y = origin[1] + bottom + max(1, size_px // 20)
            ImageDraw.Draw(mask).line([(ml, y), (ml + tw, y)], fill=255, width=max(1, size_px // 16))

        bg_level = rng.randint(0, 255)
        bg = self._background((w, h), bg_level, rng)
        bg_mean = int(np.asarray(bg).mean())
        fg_level = self._contrasting(bg_mean, rng, (20, 60) if rng.random() < c.p_low_contrast else (60, 200))
        # Painted over the background in this order: (where, grey level).
        layers: list[tuple[Image.Image, int]] = []
        if rng.random() < c.p_shadow:
            d = max(1, size_px // 15)
            shadow = ink((rng.randint(-d, d), rng.randint(1, d)))
            layers.append((shadow, self._contrasting(bg_mean, rng)))
        if stroke and arc_ink is None:
            inner = ink(stroke_w=0)
            layers.append((mask, self._contrasting(fg_level, rng)))  # the outline: the stroked text, then the text over it
            mask = inner
        layers.append((mask, fg_level))
        if tint is None:
            img, fill = self._paint_grey(bg, layers), bg_mean
        else:
            img, fill = self._paint_colour(bg, bg_mean, layers, tint)

        if curve:
            img, edges = self._curve(img, amp, rng, edges)
        if rng.random() < c.p_perspective:
            img, edges = self._perspective(img, fill, rng, edges)
        if rng.random() < c.p_rotate:
            angle = rng.gauss(0, 4) if rng.random() < 0.8 else rng.uniform(-15, 15)
            before = img.size
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=fill)
            edges = _rotated_points(edges, angle, before, img.size)
        return self._degrade(img, rng), edges

    @staticmethod
    def _paint_grey(bg: Image.Image, layers: list[tuple[Image.Image, int]]) -> Image.Image:
        """Each layer's grey level painted over ``bg`` (mode ``L``) where its mask is set."""
        for mask, level in layers:
            bg = Image.composite(Image.new("L", bg.size, level), bg, mask)
        return bg

    def _paint_colour(self, bg: Image.Image, bg_mean: int, layers: list[tuple[Image.Image, int]], tint: random.Random) -> tuple[Image.Image, RGB]:
        """``_paint_grey`` in colour: the grey background ``bg`` (mean ``bg_mean``) and the layers
        (the last one is the text) painted in colours drawn from ``tint``; returns the ``RGB``
        image and the background's colour, the fill of the geometric steps that follow.
        Ordinary crops keep every grey level as luma (``colours.tinted``); weak-luma ones
        (``p_weak_luma``) get the text and every other layer near the background's luma."""
        if tint.random() < self.cfg.p_weak_luma:
            text, background = weak_luma_pair(tint)
            colours = [weak_luma_partner(background, tint) or text for _ in layers[:-1]] + [text]
            # Keep a trace of the texture or gradient, no more: its light and shade would be luma contrast.
            bg = Image.blend(Image.new("L", bg.size, bg_mean), bg, tint.uniform(0.0, 0.4))
        else:
            background = tinted(bg_mean, tint)
            colours = [tinted(level, tint) for _, level in layers]
        img = colourise(bg, bg_mean, background)
        for (mask, _), colour in zip(layers, colours):
            img = Image.composite(Image.new("RGB", img.size, colour), img, mask)
        return img, background

    @staticmethod
    def _text(draw: ImageDraw.ImageDraw, origin: tuple[int, int], text: str, font: ImageFont.FreeTypeFont, stroke: int, spacing: int, fill: int) -> None:
        if not spacing:
            draw.text(origin, text, font=font, fill=fill, stroke_width=stroke, stroke_fill=fill)
            return
        x, y = origin
        for ch in text:
            draw.text((x, y), ch, font=font, fill=fill, stroke_width=stroke, stroke_fill=fill)
            x += font.getlength(ch) + spacing

    @staticmethod
    def _contrasting(level: int, rng: random.Random, gaps: tuple[int, int] = (60, 200)) -> int:
        gap = rng.randint(*gaps)
        options = [v for v in (level - gap, level + gap) if 0 <= v <= 255]
        if not options:
            return 0 if level > 127 else 255
        return rng.choice(options)

    @staticmethod
    def _curve(img: Image.Image, amp: int, rng: random.Random, edges: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        # CUTE80-like arcs: shift vertical strips along a parabola with a MESH transform.
        w, h = img.size
        strips = max(1, min(16, w // 4))
        sign = rng.choice((-1, 1))
        mesh = []
        for i in range(strips):
            x0, x1 = w * i // strips, w * (i + 1) // strips

            def off(x: float) -> float:
                t = 2 * x / max(w, 1) - 1
                return sign * amp * (t * t - 0.5)

            mesh.append(((x0, 0, x1, h), (x0, off(x0), x0, h + off(x0), x1, h + off(x1), x1, off(x1))))
        # Output (x, y) samples input (x, y + off(x)), off linear within a strip: a point moves up by off.
        bounds = [w * i // strips for i in range(strips)] + [w]
        shift = np.interp(edges[..., 0], bounds, [off(x) for x in bounds])
        moved = np.stack([edges[..., 0], edges[..., 1] - shift], axis=-1)
        return img.transform(img.size, Image.Transform.MESH, mesh, resample=Image.Resampling.BILINEAR, fillcolor=_top_row_mean(img)), moved

    @staticmethod
    def _perspective(img: Image.Image, fill: int | RGB, rng: random.Random, edges: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        # SVT-P-like view angles: move the corners by up to a fraction of the height.
        w, h = img.size
        j = h * rng.uniform(0.1, 0.45)
        src = [(0, 0), (w, 0), (w, h), (0, h)]
        dst = [(x + rng.uniform(-j, j), y + rng.uniform(-j, j)) for x, y in src]
        xs, ys = [p[0] for p in dst], [p[1] for p in dst]
        dst = [(x - min(xs), y - min(ys)) for x, y in dst]
        size = (max(4, int(math.ceil(max(xs) - min(xs)))), max(4, int(math.ceil(max(ys) - min(ys)))))
        a, b, c, d, e, f, g, h_ = _perspective_coeffs(dst, src)  # the forward map: input → output
        x, y = edges[..., 0], edges[..., 1]
        den = g * x + h_ * y + 1
        moved = np.stack([(a * x + b * y + c) / den, (d * x + e * y + f) / den], axis=-1)
        return img.transform(size, Image.Transform.PERSPECTIVE, _perspective_coeffs(src, dst), resample=Image.Resampling.BILINEAR, fillcolor=fill), moved

    def _degrade(self, img: Image.Image, rng: random.Random) -> Image.Image:
        c = self.cfg
        if rng.random() < c.p_lowres:
            f = rng.uniform(0.25, 0.7)
            small = img.resize((max(2, int(img.width * f)), max(2, int(img.height * f))), Image.Resampling.BILINEAR)
            img = small.resize(img.size, Image.Resampling.BILINEAR)
        if rng.random() < c.p_blur:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.4)))
        if rng.random() < c.p_noise:
            np_rng = np.random.default_rng(rng.getrandbits(32))
            pixels = np.asarray(img, dtype=np.float32)  # [h, w] or [h, w, 3]: grain on each channel
            arr = pixels + np_rng.normal(0, rng.uniform(3, 18), size=pixels.shape)
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if rng.random() < c.p_jpeg:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=rng.randint(10, 60))
            buf.seek(0)
            img = Image.open(buf).convert(img.mode)
        return img


def _top_row_mean(img: Image.Image) -> int | RGB:
    """The mean of the image's top row: a grey level, or an RGB colour for a colour image."""
    row = np.asarray(img)[0]
    if row.ndim == 1:
        return int(row.mean())
    r, g, b = (int(v) for v in row.mean(axis=0))
    return r, g, b


# -- data set writing ------------------------------------------------------------------

_WORKER: Renderer | None = None


def _init_worker(cfg: SynthConfig, faces: list[FontFace]) -> None:
    global _WORKER  # one renderer per worker process, built once
    # Ctrl-C reaches the whole process group: the parent decides what stops (the trainer after
    # its step); a worker dying of it could hold the pool's task lock (close_pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = Renderer(cfg, faces)


def render_pool(cfg: SynthConfig, faces: list[FontFace], workers: int) -> Pool:
    """A pool of ``workers`` forked processes, each holding one ``Renderer(cfg, faces)``,
    for ``render_range``. The background textures are decoded here first, once: the
    forked workers inherit them. Close it (or use it as a context manager) when done."""
    _load_textures()
    return mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(cfg, faces))


#: Seconds ``close_pool`` waits for ``Pool.terminate`` before it kills the workers itself.
CLOSE_TIMEOUT_S = 10.0


def close_pool(pool: Pool, timeout: float | None = None) -> None:
    """``pool.terminate()``, bounded. A worker killed from outside (``pkill -f "safl train"``,
    a SIGTERM to the process group or cgroup) can die while it holds the pool's task-queue
    lock, and ``terminate`` then waits on that lock forever: the trainer hung after saving its
    state. After ``timeout`` seconds every child process of this one is killed and the pool
    left to the interpreter's exit (``timeout`` default: ``CLOSE_TIMEOUT_S``)."""
    closer = threading.Thread(target=pool.terminate, name="close-render-pool", daemon=True)
    closer.start()
    closer.join(CLOSE_TIMEOUT_S if timeout is None else timeout)
    if closer.is_alive():
        for child in mp.active_children():
            child.kill()
        closer.join(1.0)


def render_range(bounds: tuple[int, int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Crops ``start..end-1`` of ``bounds = (start, end)``, their labels and fiducial points,
    rendered by the worker's renderer: uint8 ``[end - start, H, W]`` (``start < end``), a list
    of strings and float16 ``[end - start, F, 2]`` (``[end - start, H, W, 3]`` images in colour). Runs in a ``render_pool`` worker only
    (raises ``AssertionError`` elsewhere)."""
    assert _WORKER is not None, "render_range runs in a render_pool worker"
    rendered = [_WORKER.render_with_points(i) for i in range(*bounds)]
    return np.stack([r[0] for r in rendered]), [r[1] for r in rendered], np.stack([r[2] for r in rendered]).astype(np.float16)


def _shard_done(out: Path, k: int, n: int) -> bool:
    npy, txt, pts = out / f"shard-{k:05d}.npy", out / f"shard-{k:05d}.txt", out / f"shard-{k:05d}.pts.npy"
    if not (npy.is_file() and txt.is_file() and pts.is_file()):
        return False
    try:
        return np.load(npy, mmap_mode="r").shape[0] == n and np.load(pts, mmap_mode="r").shape[0] == n and len(txt.read_text().splitlines()) == n
    except (OSError, ValueError):
        return False


def render_dataset(out: Path, count: int, cfg: SynthConfig, workers: int = 2, shard_size: int = 50000, fmt: str = "npy", progress: bool = True) -> dict:
    """Render ``count`` crops into ``out``; finished shards of an earlier run are kept.

    Returns a summary with the images/s achieved.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    faces = discover_fonts(cfg.charset, cache=out / "fonts.json")
    meta = {"renderer_version": RENDERER_VERSION, "count": count, "shard_size": shard_size, "format": fmt, "fonts": len(faces), **asdict(cfg)}
    old = out / "meta.json"
    if old.is_file():
        prev = json.loads(old.read_text())
        prev.setdefault("text_mix", asdict(TextMix()))  # written before the mix was recorded: the default then
        prev.setdefault("p_weak_luma", SynthConfig.p_weak_luma)  # written before colour: grey crops never draw it
        prev["text_mix"].setdefault("phrase", 0.0)  # written before phrases: none
        if {k: v for k, v in prev.items() if k != "count"} != {k: v for k, v in meta.items() if k != "count"}:
            raise SystemExit(f"{out} holds a data set rendered with other settings; use another --out or delete it")
    old.write_text(json.dumps(meta, indent=2))

    chunk = 500
    shards = [(k, k * shard_size, min(count, (k + 1) * shard_size)) for k in range(math.ceil(count / shard_size))]
    todo = shards if fmt == "lmdb" else [s for s in shards if not _shard_done(out, s[0], s[2] - s[1])]
    total = sum(e - s for _, s, e in todo)
    t0 = time.perf_counter()
    lmdb_writer = _LmdbWriter(out, count) if fmt == "lmdb" else None
    with render_pool(cfg, faces, workers) as pool, tqdm(total=total, unit="img", disable=not progress, desc="render") as bar:
        for k, start, end in todo:
            ranges = [(i, min(i + chunk, end)) for i in range(start, end, chunk)]
            arrays, labels, points = [], [], []
            for arr, lab, pts in pool.imap(render_range, ranges):
                arrays.append(arr)
                labels += lab
                points.append(pts)
                bar.update(len(lab))
            images = np.concatenate(arrays)
            if lmdb_writer is not None:
                lmdb_writer.write(start, images, labels)  # the LMDB layout has no place for points
            else:
                np.save(out / f"shard-{k:05d}.npy.tmp.npy", images)
                np.save(out / f"shard-{k:05d}.pts.tmp.npy", np.concatenate(points))
                (out / f"shard-{k:05d}.txt.tmp").write_text("\n".join(labels) + "\n")
                # The images last: a shard counts as done (and is loaded) once its .npy exists.
                (out / f"shard-{k:05d}.pts.tmp.npy").replace(out / f"shard-{k:05d}.pts.npy")
                (out / f"shard-{k:05d}.txt.tmp").replace(out / f"shard-{k:05d}.txt")
                (out / f"shard-{k:05d}.npy.tmp.npy").replace(out / f"shard-{k:05d}.npy")
    if lmdb_writer is not None:
        lmdb_writer.close()
    secs = time.perf_counter() - t0
    rate = total / secs if secs > 0 else 0.0
    summary = {"rendered": total, "seconds": round(secs, 1), "images_per_s": round(rate, 1), "out": str(out), "fonts": len(faces)}
    print(f"rendered {total} crops in {secs:.1f}s ({rate:.0f} images/s, {workers} workers, {len(faces)} fonts) → {out}")
    return summary


class _LmdbWriter:
    """Writes the STR community's LMDB layout (PNG-encoded images)."""

    def __init__(self, out: Path, count: int) -> None:
        import lmdb

        self.env = lmdb.open(str(out), map_size=max(1 << 30, count * 16384))
        self.count = count

    def write(self, start: int, images: np.ndarray, labels: list[str]) -> None:
        with self.env.begin(write=True) as txn:
            for j, (im, lab) in enumerate(zip(images, labels)):
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                txn.put(f"image-{start + j + 1:09d}".encode(), buf.getvalue())
                txn.put(f"label-{start + j + 1:09d}".encode(), lab.encode())

    def close(self) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(b"num-samples", str(self.count).encode())
        self.env.close()

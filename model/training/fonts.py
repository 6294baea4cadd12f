"""Font discovery for the synthetic renderer.

The renderer uses the Latin fonts of Debian's font packages. Install them with::

    apt-get install --no-install-recommends $(python -m model.training.fonts --packages)

Any ``.ttf``/``.otf`` under the font directories whose character map covers the
letters and digits is used; a font is only given text whose every character it has
a glyph for, so labels always match what was drawn. Fonts are sampled by family, so
a package with many weights of one face does not crowd out the others.
"""

from __future__ import annotations

import functools
import json
import os
import string
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

#: Debian packages with Latin faces: serif, sans, mono, condensed, bold, display and
#: handwriting-like. Together they hold a few hundred families.
DEBIAN_FONT_PACKAGES = (
    "fonts-dejavu fonts-liberation fonts-liberation2 fonts-freefont-ttf fonts-croscore fonts-crosextra-caladea "
    "fonts-crosextra-carlito fonts-urw-base35 fonts-texgyre fonts-roboto fonts-roboto-slab fonts-open-sans fonts-lato "
    "fonts-cabin fonts-comfortaa fonts-quicksand fonts-dosis fonts-ebgaramond fonts-linuxlibertine fonts-noto-core "
    "fonts-noto-mono fonts-go fonts-hack-ttf fonts-inconsolata fonts-firacode fonts-jetbrains-mono fonts-anonymous-pro "
    "fonts-courier-prime fonts-comic-neue fonts-lobster fonts-lobstertwo fonts-yanone-kaffeesatz fonts-bebas-neue "
    "fonts-league-spartan fonts-oldstandard fonts-vollkorn fonts-karla fonts-inter fonts-manrope fonts-play fonts-tuffy "
    "fonts-cantarell fonts-oxygen fonts-b612 fonts-clear-sans fonts-averia-gwf fonts-averia-sans-gwf "
    "fonts-averia-serif-gwf fonts-adf-accanthis fonts-adf-baskervald fonts-adf-berenis fonts-adf-gillius "
    "fonts-adf-libris fonts-adf-mekanus fonts-adf-romande fonts-adf-switzera fonts-adf-tribun fonts-adf-universalis "
    "fonts-adf-verana fonts-cabinsketch fonts-dustin fonts-isabella fonts-kristi fonts-staypuft fonts-tomsontalks "
    "fonts-rocknroll fonts-cherrybomb fonts-opendin fonts-ocr-a fonts-ocr-b fonts-national-park fonts-roadgeek "
    "fonts-ubuntu-title fonts-sora fonts-monoid fonts-mononoki fonts-fantasque-sans fonts-arapey fonts-quattrocento "
    "fonts-allerta fonts-junction fonts-prociono fonts-goudybookletter fonts-gotico-antiqua fonts-blankenburg "
    "fonts-eurofurence fonts-tiresias fonts-paratype fonts-cmu fonts-opendyslexic fonts-mplus"
).split()

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts")
#: Folders to look for fonts in instead of ``FONT_DIRS`` (``os.pathsep``-separated): your own
#: fonts, or a GPU bundle's subsets (``scripts/gpu_train.sh``), without installing them.
FONT_DIRS_ENV = "SAFL_FONT_DIRS"
REQUIRED = set(string.ascii_letters + string.digits)
_SKIP_WORDS = ("emoji", "symbol", "dingbat", "math", "music", "braille", "color", "keyboard")

#: Families the renderer never trains on: the clean-text benchmark (``bench/clean_text.py``)
#: reads words in these, so it measures fonts the model has not seen. Metric clones go
#: together (Liberation 2 = Arimo / Tinos / Cousine; Carlito is derived from Lato).
HELD_OUT_FAMILIES = frozenset(
    {
        "Liberation Sans",
        "Liberation Sans Narrow",
        "Liberation Serif",
        "Liberation Mono",
        "Arimo",
        "Tinos",
        "Cousine",
        "Lato",
        "Carlito",
        "Vollkorn",
        "PT Sans",
        "PT Sans Caption",
        "PT Sans Narrow",
        "PT Serif",
        "PT Serif Caption",
        "PT Mono",
    }
)
FAMILY_SETS = ("train", "held_out", "all")


@dataclass(frozen=True)
class FontFace:
    """A usable font file, its family, and the characters of the charset and the space it can draw."""

    path: str
    family: str
    chars: frozenset[str]


def _inspect(path: Path, wanted: str) -> FontFace | None:
    from fontTools.ttLib import TTFont  # training-only dependency

    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as font:
            cmap = font.getBestCmap() or {}
            family = font["name"].getBestFamilyName() or path.stem
    except Exception:  # noqa: BLE001 - a broken font file is skipped, not fatal
        return None
    if any(w in family.lower() for w in _SKIP_WORDS):
        return None  # e.g. "Linux Biolinum Keyboard O": keycaps, not letters
    chars = frozenset(c for c in wanted if ord(c) in cmap)
    if not REQUIRED <= chars:
        return None
    return FontFace(str(path), family, chars)


def glyph_text(charset: str) -> str:
    """The characters fonts are looked up (and subset) for: ``charset`` and the space, once each.
    The space for every charset: phrases need it, words never ask for it, and one scan per
    process then serves a charset with the space and the same without it."""
    return "".join(dict.fromkeys(charset + " "))


def search_dirs(env: str, default: tuple[Path, ...]) -> tuple[Path, ...]:
    """The folders named by the environment variable ``env`` (``os.pathsep``-separated), else ``default``."""
    value = os.environ.get(env, "")
    return tuple(Path(p) for p in value.split(os.pathsep) if p) or default


def discover_fonts(wanted: str, dirs: tuple[Path, ...] | None = None, cache: Path | None = None, families: str = "train") -> list[FontFace]:
    """Usable fonts under ``dirs`` (default: ``$SAFL_FONT_DIRS``, else ``FONT_DIRS``), sorted
    by path (deterministic across runs).

    ``families``: ``"train"`` (default: all but ``HELD_OUT_FAMILIES``), ``"held_out"`` (only
    those) or ``"all"``. The ``cache`` file lists every usable face. Raises ``ValueError``
    for another ``families``.
    """
    if families not in FAMILY_SETS:
        raise ValueError(f"families must be one of {FAMILY_SETS}, got {families!r}")
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        cached = [
            FontFace(d["path"], d["family"], frozenset(d["chars"]))
            for d in data
            if Path(d["path"]).is_file() and not any(w in d["family"].lower() for w in _SKIP_WORDS)
        ]
        return _of_families(cached, families)
    faces = list(_scan(glyph_text(wanted), tuple(dirs) if dirs is not None else search_dirs(FONT_DIRS_ENV, FONT_DIRS)))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([{"path": f.path, "family": f.family, "chars": "".join(sorted(f.chars))} for f in faces]))
    faces = _of_families(faces, families)
    if not faces:
        warnings.warn(
            "no system fonts found: the renderer falls back to Pillow's built-in font. Install Debian's fonts with "
            "`apt-get install " + " ".join(DEBIAN_FONT_PACKAGES[:3]) + " …` (see model/training/fonts.py)",
            stacklevel=2,
        )
    return faces


@functools.lru_cache(maxsize=4)
def _scan(wanted: str, dirs: tuple[Path, ...]) -> tuple[FontFace, ...]:
    # Reading every font's cmap takes ~40 s with a few hundred families installed: once per process.
    paths = sorted({p for d in dirs if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf")})
    faces = []
    for p in paths:
        if any(w in p.name.lower() for w in _SKIP_WORDS):
            continue
        face = _inspect(p, wanted)
        if face is not None:
            faces.append(face)
    return tuple(faces)


def _of_families(faces: list[FontFace], families: str) -> list[FontFace]:
    if families == "all":
        return faces
    return [f for f in faces if (f.family in HELD_OUT_FAMILIES) == (families == "held_out")]


def by_family(faces: list[FontFace]) -> list[list[FontFace]]:
    """Group faces into families (sorted), for family-uniform sampling."""
    groups: dict[str, list[FontFace]] = defaultdict(list)
    for f in faces:
        groups[f.family].append(f)
    return [groups[k] for k in sorted(groups)]


if __name__ == "__main__":
    if "--packages" in sys.argv:
        print(" ".join(DEBIAN_FONT_PACKAGES))
    else:
        from model.charset import DEFAULT_CHARS

        found = discover_fonts(DEFAULT_CHARS, families="all")
        held = discover_fonts(DEFAULT_CHARS, families="held_out")
        print(f"{len(found)} font files in {len(by_family(found))} families ({len(by_family(held))} families held out of training for bench/clean_text.py)")
        if len(by_family(found)) < 20:
            print(
                "few fonts: synthetic data in few families generalises poorly. Install Debian's font packages with\n"
                "  apt-get install --no-install-recommends $(python -m model.training.fonts --packages)"
            )

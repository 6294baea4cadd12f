"""Pack what a GPU training run needs into ``.gpu/`` (git-ignored), small enough to
travel with the working tree to a lent GPU machine that has no network and no
Debian fonts.

    python scripts/gpu_bundle.py [--init CKPT] [--charset STRING|FILE] [--real ../shared/data/train]

- ``fonts/``: every font the renderer would use here, subset to the charset and the space
  (fontTools), so 240 MB of font packages shrink to about 15 MB with the same glyphs;
- ``backgrounds/``: the wallpaper textures, already at the size the renderer uses;
- ``shim/wordfreq.py`` + ``wordfreq_en.tsv``: the lexicon the renderer draws from, as
  a stand-in for the ``wordfreq`` package (whose wheel carries every language);
- ``real/<set>/``: the real train splits pre-processed to the model input (32×128
  grey lossless WebP, same ``labels.tsv`` order, so the fixed-seed val/fine-tune split is
  unchanged and re-preprocessing them is the identity). Their shape is gone, so
  validation there never turns a tall crop (it reads the crop alone): re-evaluate a
  GPU checkpoint here (``safl eval``) before comparing it with the shipped one;
- ``whl/``: wheels the GPU image lacks (``GPU_WHEELS``: what the training and serving code
  imports beyond the image's packages, ``gpu_image_packages.txt``; ``tests/test_gpu_bundle.py``
  checks the list against the dependencies installed here);
- ``init/``: the checkpoint the leg starts from (``--init``), unless it is the shipped one,
  which travels with the working tree;
- ``charset.txt``: with ``--charset``, the characters the leg trains over (a spaced charset
  makes the stream render phrases);
- ``MANIFEST.json``: what was packed (the init and its sha256, the charset, the fonts and how
  many draw the space, the size), which ``gpu_train.sh`` prints and checks first.

``scripts/gpu_train.sh`` unpacks it on the GPU machine. A bundle must stay under the 64 MiB that
travel with the working tree (about 14 MiB of it); the bundler refuses a larger one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.charset import DEFAULT_CHARS  # noqa: E402
from model.preprocess import PreprocessConfig, resize  # noqa: E402
from model.training.data import read_labels_tsv  # noqa: E402
from model.training.fonts import discover_fonts, glyph_text  # noqa: E402
from model.training.synth import BACKGROUND_DIRS  # noqa: E402


def subset_text(charset: str | None) -> str:
    """What the fonts are subset to: the charset's glyphs and the space (phrases, for a model that reads it)."""
    return glyph_text(charset or DEFAULT_CHARS)


def pack_fonts(out: Path, text: str) -> tuple[int, int]:
    """Subset every font the renderer would use here for ``text`` into ``out`` (kept from an
    earlier bundle only when it was subset to the same text); returns (fonts, fonts that draw the space)."""
    from fontTools import subset
    from fontTools.ttLib import TTFont

    stamp = out / ".subset-text"
    if out.is_dir() and (not stamp.is_file() or stamp.read_text(encoding="utf-8") != text):
        shutil.rmtree(out)  # subset to other text (stop 34's had no space: the leg's phrases found no font)
    out.mkdir(parents=True, exist_ok=True)
    faces = discover_fonts(text)
    opts = subset.Options()
    opts.name_IDs = ["*"]  # keep family names: the renderer samples by family
    opts.layout_features = ["kern", "liga", "calt", "clig"]
    opts.notdef_outline = True
    for face in faces:
        src = Path(face.path)
        # Unique, stable file names: the same base name exists in several packages.
        dst = out / f"{hashlib.sha1(face.path.encode()).hexdigest()[:10]}-{src.name}"
        if dst.is_file():
            continue
        try:
            font = subset.load_font(str(src), opts)
            sub = subset.Subsetter(opts)
            sub.populate(text=text)
            sub.subset(font)
            subset.save_font(font, str(dst), opts)
        except Exception as exc:  # noqa: BLE001 - a font that will not subset is left behind
            print(f"skip {src}: {exc}")
    stamp.write_text(text, encoding="utf-8")
    packed = sorted(p for p in out.iterdir() if p.suffix.lower() in (".ttf", ".otf"))
    with_space = 0
    for p in packed:
        with TTFont(str(p), lazy=True) as font:
            with_space += 32 in (font.getBestCmap() or {})
    print(f"fonts: {len(packed)} of {len(faces)} faces ({with_space} draw the space) -> {sum(p.stat().st_size for p in packed) / 1e6:.1f} MB")
    return len(packed), with_space


def pack_backgrounds(out: Path, max_side: int = 480) -> None:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for d in BACKGROUND_DIRS:
        for p in sorted(d.rglob("*")) if d.is_dir() else []:
            if p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
                continue
            with Image.open(p) as im:
                im.draft("L", (max_side, max_side))
                im = im.convert("L")
                im.thumbnail((max_side, max_side))
                im.save(out / f"{n:03d}-{p.stem}.png")
                n += 1
    print(f"backgrounds: {n}")


def pack_lexicon(out: Path, size: int = 100000) -> None:
    import wordfreq

    out.mkdir(parents=True, exist_ok=True)
    words = wordfreq.top_n_list("en", size)
    with open(out / "wordfreq_en.tsv", "w") as fh:
        for w in words:
            fh.write(f"{w}\t{wordfreq.word_frequency(w, 'en')!r}\n")
    (out / "wordfreq.py").write_text(
        '"""Stand-in for wordfreq on the GPU machine: English top-n list and frequencies from a dump."""\n'
        "from pathlib import Path\n\n"
        "_ROWS = [line.split('\\t') for line in (Path(__file__).with_name('wordfreq_en.tsv')).read_text().splitlines()]\n"
        "_FREQ = {w: float(f) for w, f in _ROWS}\n\n\n"
        "def top_n_list(lang, n):\n    assert lang == 'en'\n    return [w for w, _ in _ROWS[:n]]\n\n\n"
        "def word_frequency(word, lang):\n    assert lang == 'en'\n    return _FREQ.get(word, 0.0)\n"
    )
    print(f"lexicon: {len(words)} words")


def pack_real(real: Path, out: Path) -> None:
    cfg = PreprocessConfig()
    for folder in sorted(p for p in real.iterdir() if (p / "labels.tsv").is_file()):
        dst = out / folder.name
        labels = read_labels_tsv(folder)
        want = [f"{i:05d}.webp\t{text}" for i, (_, text) in enumerate(labels)]
        done = dst / "labels.tsv"
        if done.is_file() and done.read_text(encoding="utf-8").splitlines() == want and all((dst / f"{i:05d}.webp").is_file() for i in range(len(want))):
            print(f"real: {folder.name} {len(want)} (packed before)")  # the same crops: packing is deterministic
            continue
        dst.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (name, text) in enumerate(labels):
            with Image.open(folder / name) as im:
                # Lossless WebP: 2.4x smaller than PNG on these noisy photos, pixels unchanged.
                Image.fromarray(resize(im, cfg)).save(dst / f"{i:05d}.webp", lossless=True, method=6)
            lines.append(f"{i:05d}.webp\t{text}")
        (dst / "labels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"real: {folder.name} {len(lines)}")


#: What the GPU image (CUDA, torch, numpy, onnxruntime, Pillow, httpx, prometheus-client ...:
#: ``gpu_image_packages.txt``) lacks of the training and serving stack, for its Python 3.12: the
#: versions this project's CPU environment resolves. ``typing-extensions`` travels although the
#: image has it: pydantic 2.14 needs 4.16, and the image's version is not known.
GPU_WHEELS = (
    "rapidfuzz==3.14.6",
    "fastapi==0.165.0",
    "fastapi-offline==1.7.7",
    "opentelemetry-api==1.45.3",
    "starlette==1.10.0",
    "uvicorn==0.55.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "pydantic-settings==2.16.3",
    "python-dotenv==1.2.4",
    "python-multipart==0.0.34",
    "annotated-types==0.8.0",
    "annotated-doc==0.0.7",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
)
#: The packages the GPU image holds (the device tool's KINDS.md), one name a line.
IMAGE_PACKAGES = Path(__file__).with_name("gpu_image_packages.txt")
#: What may travel with the working tree (64 MiB) less the tracked tree's ~14 MiB and a margin.
MAX_BUNDLE_BYTES = 45 * 2**20


def pack_wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plats = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *plats,
        "-d",
        str(out),
        *GPU_WHEELS,
    ]
    subprocess.run(cmd, check=True)
    # Wheels of an earlier list go: two versions of one package stop the whole install there.
    wanted = {tuple(_normal(part) for part in w.split("==")) for w in GPU_WHEELS}
    for whl in out.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        if (_normal(name), _normal(version)) not in wanted:
            whl.unlink()
    print(f"wheels: {len(list(out.glob('*.whl')))}")


def _normal(name: str) -> str:
    """A distribution name or version as wheel file names write it (runs of ``-_.`` as ``_``, lower case): pins and files compare so."""
    return re.sub(r"[-_.]+", "_", name).lower()


def pack_init(weights: Path, out: Path) -> str:
    """The checkpoint the GPU leg starts from: the shipped one travels with the working tree;
    another is copied to ``out/init.safetensors`` (+ its sidecar). Returns its path from the root."""
    shipped = ROOT / "weights/safl.safetensors"
    if out.is_dir():
        shutil.rmtree(out)
    if weights.resolve() == shipped.resolve():
        print(f"init: {shipped.relative_to(ROOT)} (travels with the tree)")
        return str(shipped.relative_to(ROOT))
    out.mkdir(parents=True)
    for src, name in ((weights, "init.safetensors"), (weights.with_suffix(".json"), "init.json")):
        shutil.copyfile(src, out / name)
    print(f"init: {weights}")
    return str((out / "init.safetensors").relative_to(ROOT))


def pack_charset(value: str | None, out: Path) -> str | None:
    """``--charset`` (characters, or a file holding them) as ``out`` (no line end: a trailing
    space is a character); without one, no file and the init's charset."""
    from model.training.train import read_charset

    out.unlink(missing_ok=True)
    if value is None:
        return None
    chars = read_charset(value)
    out.write_text(chars, encoding="utf-8")
    print(f"charset: {len(chars)} characters{', the space among them' if ' ' in chars else ''}")
    return chars


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared/data/train")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    ap.add_argument("--init", type=Path, default=ROOT / "weights/safl.safetensors", help="the checkpoint the GPU leg starts from")
    ap.add_argument("--charset", help="the characters the leg trains over (a string, or a file holding them); default: the init's")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    init = pack_init(args.init, args.out / "init")
    charset = pack_charset(args.charset, args.out / "charset.txt")
    pack_lexicon(args.out / "shim")
    pack_wheels(args.out / "whl")
    pack_backgrounds(args.out / "backgrounds")
    pack_real(args.real, args.out / "real")
    fonts, fonts_with_space = pack_fonts(args.out / "fonts", subset_text(charset))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    manifest = {
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "init": init,
        "init_sha256": hashlib.sha256((ROOT / init).read_bytes()).hexdigest(),
        "charset": charset,
        "fonts": fonts,
        "fonts_with_space": fonts_with_space,
        "wheels": list(GPU_WHEELS),
        "bytes": total,
    }
    print(f"bundle: {total / 1e6:.1f} MB in {args.out}")
    # Checked before the manifest is written: gpu_train.sh runs only a bundle that has one.
    (args.out / "MANIFEST.json").unlink(missing_ok=True)
    if total > MAX_BUNDLE_BYTES:
        raise SystemExit(f"the bundle is {total / 2**20:.0f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB that may travel beside the tree")
    if charset and " " in charset and not fonts_with_space:
        raise SystemExit("the charset holds the space but no packed font draws it: the stream would render no phrase")
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()

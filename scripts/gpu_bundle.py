"""Pack what a GPU training run needs into ``.gpu/`` (git-ignored), small enough to
travel with the working tree to a lent GPU machine that has no network and no
Debian fonts.

    python scripts/gpu_bundle.py [--real ../shared/data/train]

- ``fonts/``: every font the renderer would use here, subset to the model's charset
  (fontTools), so 240 MB of font packages shrink to a few MB with the same glyphs;
- ``backgrounds/``: the wallpaper textures, already at the size the renderer uses;
- ``shim/wordfreq.py`` + ``wordfreq_en.tsv``: the lexicon the renderer draws from, as
  a stand-in for the ``wordfreq`` package (whose wheel carries every language);
- ``real/<set>/``: the real train splits pre-processed to the model input (32×128
  grey lossless WebP, same ``labels.tsv`` order, so the fixed-seed val/fine-tune split is
  unchanged and re-preprocessing them is the identity). Their shape is gone, so
  validation there never turns a tall crop (it reads the crop alone): re-evaluate a
  GPU checkpoint here (``safl eval``) before comparing it with the shipped one;
- ``whl/``: wheels the GPU image lacks (``GPU_WHEELS``: the validation metrics and the service stack);
- ``init/``: the checkpoint the leg starts from (``--init``).

``scripts/gpu_train.sh`` unpacks it on the GPU machine.
"""

from __future__ import annotations

import argparse
import hashlib
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
from model.training.fonts import discover_fonts  # noqa: E402
from model.training.synth import BACKGROUND_DIRS  # noqa: E402


def pack_fonts(out: Path) -> None:
    from fontTools import subset

    out.mkdir(parents=True, exist_ok=True)
    faces = discover_fonts(DEFAULT_CHARS)
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
            sub.populate(text=DEFAULT_CHARS + " ")  # the space too: phrases, for a model that reads it
            sub.subset(font)
            subset.save_font(font, str(dst), opts)
        except Exception as exc:  # noqa: BLE001 - a font that will not subset is left behind
            print(f"skip {src}: {exc}")
    print(f"fonts: {len(faces)} faces -> {sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB")


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
        dst.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (name, text) in enumerate(read_labels_tsv(folder)):
            with Image.open(folder / name) as im:
                # Lossless WebP: 2.4x smaller than PNG on these noisy photos, pixels unchanged.
                Image.fromarray(resize(im, cfg)).save(dst / f"{i:05d}.webp", lossless=True, method=6)
            lines.append(f"{i:05d}.webp\t{text}")
        (dst / "labels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"real: {folder.name} {len(lines)}")


#: What the GPU image (CUDA, torch, numpy, onnxruntime, Pillow, httpx, prometheus-client ...; the
#: device tool's KINDS.md) lacks of the training and serving stack, for its Python 3.12: the
#: versions this project's CPU environment resolves.
GPU_WHEELS = (
    "rapidfuzz==3.14.6",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.55.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "pydantic-settings==2.16.3",
    "python-dotenv==1.2.4",
    "python-multipart==0.0.34",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
)


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


def pack_init(weights: Path, out: Path) -> None:
    """The checkpoint the GPU leg starts from, as ``out/init.safetensors`` (+ its sidecar)."""
    out.mkdir(parents=True, exist_ok=True)
    for src, name in ((weights, "init.safetensors"), (weights.with_suffix(".json"), "init.json")):
        shutil.copyfile(src, out / name)
    print(f"init: {weights}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared/data/train")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    ap.add_argument("--init", type=Path, default=ROOT / "weights/safl.safetensors", help="the checkpoint the GPU leg starts from")
    args = ap.parse_args()
    pack_init(args.init, args.out / "init")
    pack_lexicon(args.out / "shim")
    pack_wheels(args.out / "whl")
    pack_backgrounds(args.out / "backgrounds")
    pack_real(args.real, args.out / "real")
    pack_fonts(args.out / "fonts")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"bundle: {total / 1e6:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()

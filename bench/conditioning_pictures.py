"""The pictures of docs/conditioning.md, made by the commands it shows, on built-in MNIST.

- Several labels per picture: a label table gives each training digit two labels, ``even`` or
  ``odd`` and ``small`` (0-4) or ``large`` (5-9); ``sample --labels "even,large"`` should draw
  6s and 8s.
- A condition picture per target: each digit's outline (a 3x3 morphological gradient) is its
  condition; ``sample --cond`` draws digits inside held-out outlines.
- The cascade: ``bench/cascade.py``'s 16 px base and 16 -> 32 stage (``--cascade DIR``), chained
  by ``sample --upsample``, and ``upscale`` of real held-out 16 px digits.

Usage (prints every command it runs; several minutes per run on 2 CPU cores)::

    python bench/conditioning_pictures.py --out bench-out/pictures --cascade bench-out/cascade

The pictures go to ``docs/images/conditioning_*.png``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from quality import export_train_split, split
from scipy import ndimage

from difforge.images import save_png

DOCS = Path(__file__).resolve().parent.parent / "docs" / "images"


def run(*args: str) -> None:
    command = [sys.executable, "-m", "difforge", *args]
    print("$ difforge", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def label_table(data: Path, out: Path) -> Path:
    """``file,labels`` rows: parity and size of each digit (its class folder)."""
    rows = ["file,labels"]
    for file in sorted(data.glob("*/*.png")):
        digit = int(file.parent.name)
        labels = ["even" if digit % 2 == 0 else "odd", "small" if digit < 5 else "large"]
        rows.append(f"{file.parent.name}/{file.name},{';'.join(labels)}")
    path = out / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def outline(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> its 3x3 morphological gradient, the digit's outline."""
    grey = image.astype(np.int16)
    gradient = ndimage.grey_dilation(grey, size=(3, 3)) - ndimage.grey_erosion(grey, size=(3, 3))
    return np.clip(gradient, 0, 255).astype(np.uint8)


def outlines(data: Path, out: Path) -> Path:
    """A folder of outlines paired with ``data``'s files by path."""
    folder = out / "outlines"
    for file in sorted(data.glob("*/*.png")):
        target = folder / file.parent.name / file.name
        if not target.is_file():
            from PIL import Image

            save_png(target, outline(np.asarray(Image.open(file).convert("L"))))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/pictures"))
    parser.add_argument("--cascade", type=Path, help="bench/cascade.py's --out (base and sr runs)")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    data = export_train_split(*split()[:2])
    common = ["--preset", "mnist", "--channels", "1", "--steps", str(args.steps), "--no-progress"]

    labelled = out / "labels-run"
    if not (labelled / "ema.safetensors").is_file():
        run("train", str(data), "--labels", str(label_table(data, out)), *common, "--out", str(labelled))
    for labels in ("even,large", "odd,small"):
        name = labels.replace(",", "_")
        run(
            "sample",
            str(labelled),
            "--labels",
            labels,
            "-n",
            "16",
            "--out",
            str(DOCS / f"conditioning_{name}.png"),
        )

    paired = out / "outline-run"
    conditions = outlines(data, out)
    if not (paired / "ema.safetensors").is_file():
        run("train", str(data), "--cond-dir", str(conditions), *common, "--out", str(paired))
    held = out / "held-out-outlines"
    held.mkdir(exist_ok=True)
    for i, image in enumerate(split()[2][:6]):
        save_png(held / f"outline{i}.png", outline(image[..., 0]))
    run(
        "sample",
        str(paired),
        "--cond",
        str(held),
        "-n",
        "4",
        "--out",
        str(DOCS / "conditioning_outlines.png"),
    )

    if args.cascade is not None:
        base, stage = args.cascade / "base", args.cascade / "sr"
        grid = out / "cascade.png"
        run("sample", str(base), "--upsample", str(stage), "-n", "16", "--out", str(grid))
        shutil.copy(out / "cascade_stages.png", DOCS / "conditioning_cascade.png")
        small = out / "small-digits"
        small.mkdir(exist_ok=True)
        for i, image in enumerate(split()[2][:8]):
            from PIL import Image

            Image.fromarray(image[..., 0]).resize((16, 16), Image.BOX).save(small / f"digit{i}.png")
        run("upscale", str(stage), str(small), "--out", str(out / "upscaled"))
        shutil.copy(out / "upscaled" / "comparison.png", DOCS / "conditioning_upscale.png")


if __name__ == "__main__":
    main()

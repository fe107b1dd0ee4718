"""``make-dataset`` generators. ``digits-shift``: real handwritten digits beside a label-coloured patch.

scikit-learn's ``load_digits`` (1,797 real 8×8 digits) split into four disjoint sets of digit images:

- ``teacher-train``: the patch colour is random, independent of the label (a teacher learns the digit);
- ``train`` / ``val``: the patch colour is the label's colour with probability ``tie`` (Waterbirds-style shortcut);
- ``test-ood``: the patch colour is always the colour of the *next* label, so a shortcut-only model scores 0%.

Each image: the digit upscaled to half the canvas, blended at a random position on a grey (0.35) canvas with
Gaussian noise (std 0.08), plus a square patch (a quarter of the canvas side) at a random spot that does not
overlap the digit. Deterministic given the seed.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["make_digits_shift", "DATASETS", "write_wds_shards", "CLASS_COLOURS"]

#: One colour per digit class (matplotlib's tab10).
CLASS_COLOURS = np.array([
    [0.122, 0.467, 0.706], [1.000, 0.498, 0.055], [0.173, 0.627, 0.173], [0.839, 0.153, 0.157],
    [0.580, 0.404, 0.741], [0.549, 0.337, 0.294], [0.890, 0.467, 0.761], [0.498, 0.498, 0.498],
    [0.737, 0.741, 0.133], [0.090, 0.745, 0.812]], dtype=np.float32)

SPLITS = {"teacher-train": (1097, 1), "train": (300, 1), "val": (200, 2), "test-ood": (200, 2)}  # (digits, draws)


@dataclass(frozen=True)
class _Record:
    key: str
    png: bytes
    label: int


def _render(digit: np.ndarray, colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    d = size // 2
    glyph = np.asarray(Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((d, d), Image.Resampling.BILINEAR),
                       dtype=np.float32) / 255.0
    canvas = np.full((size, size, 3), 0.35, dtype=np.float32)
    top, left = rng.integers(0, size - d + 1, size=2)
    region = canvas[top:top + d, left:left + d]
    canvas[top:top + d, left:left + d] = region * (1 - glyph[..., None]) + glyph[..., None]
    p = max(2, size // 4)
    while True:  # a patch position that does not overlap the digit's box
        pt, pl = rng.integers(0, size - p + 1, size=2)
        if pt + p <= top or pt >= top + d or pl + p <= left or pl >= left + d:
            break
    canvas[pt:pt + p, pl:pl + p] = colour
    canvas += rng.normal(0.0, 0.08, size=canvas.shape).astype(np.float32)
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _patch_class(split: str, label: int, tie: float, rng: np.random.Generator) -> int:
    if split == "teacher-train":
        return int(rng.integers(0, 10))
    if split == "test-ood":
        return (label + 1) % 10
    return label if rng.random() < tie else int(rng.choice([c for c in range(10) if c != label]))


def _split_records(split: str, images: np.ndarray, labels: np.ndarray, draws: int, size: int, tie: float,
                   rng: np.random.Generator) -> list[_Record]:
    out = []
    for draw in range(draws):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            colour = CLASS_COLOURS[_patch_class(split, int(label), tie, rng)]
            out.append(_Record(f"{split}-{draw}-{i:05d}", _png(_render(img, colour, size, rng)), int(label)))
    return out


def write_wds_shards(records: list[_Record], out_dir: Path, prefix: str, shard_size: int) -> list[Path]:
    """Write records as WebDataset tar shards (``png`` + ``cls``), each to a temporary name then renamed."""
    import webdataset as wds

    paths = []
    for n, start in enumerate(range(0, len(records), shard_size)):
        final = out_dir / f"{prefix}-{n:06d}.tar"
        tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
        with wds.TarWriter(str(tmp), mtime=0.0) as sink:
            for rec in records[start:start + shard_size]:
                sink.write({"__key__": rec.key, "png": rec.png, "cls": str(rec.label).encode()})
        os.replace(tmp, final)
        paths.append(final)
    return paths


def check_dataset_dir(out: Path) -> None:
    """Refuse a file, or a directory holding anything but digits-shift shards (which are regenerated in place).

    Raises:
        FileExistsError: naming the target and what is there (nothing is written).
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    own = re.compile(rf"^\.?({'|'.join(map(re.escape, SPLITS))})-\d{{6}}\.tar(\.tmp-\d+)?$")
    foreign = sorted(p.name for p in out.iterdir() if not own.match(p.name)) if out.is_dir() else []
    if foreign:
        raise FileExistsError(f"--out {out} holds files make-dataset did not write ({', '.join(foreign[:3])}"
                              f"{', …' if len(foreign) > 3 else ''}): e2kd never writes into a directory it does not "
                              f"own — empty it yourself or choose another --out")


def make_digits_shift(out_dir: str | Path, seed: int = 0, tie: float = 1.0, image_size: int = 64,
                      shard_size: int = 250) -> dict[str, list[Path]]:
    """Generate the digits-shift dataset as WebDataset shards ``{split}-{NNNNNN}.tar`` in ``out_dir``."""
    from sklearn.datasets import load_digits

    if not 0.0 <= tie <= 1.0:
        raise ValueError(f"tie must be in [0, 1], got {tie}")
    if image_size < 16:
        raise ValueError(f"image size must be >= 16, got {image_size}")
    out = Path(out_dir)
    check_dataset_dir(out)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    start = 0
    for split, (count, draws) in SPLITS.items():
        idx = order[start:start + count]
        start += count
        records = _split_records(split, digits.images[idx], digits.target[idx], draws, image_size, tie, rng)
        written[split] = write_wds_shards(records, out, split, shard_size)
    return written


DATASETS: dict[str, Callable[..., dict[str, list[Path]]]] = {"digits-shift": make_digits_shift}

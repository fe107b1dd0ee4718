"""How fast can a GPU decode the student's JPEGs? A probe for the loader's next step (issue 24's GPU goal).

On the H200 the student loader ran at 2.29× the in-memory floor, bound by CPU JPEG decoding (~1,400 photos/s from
8 workers where the step wants ~3,300/s). This measures, on one machine and one run, photos/s of:
  - CPU: Pillow decode + one random-resized crop rendered at 224 px in uint8 (e2kd's render), one thread;
  - GPU: ``torchvision.io.decode_jpeg`` batched on the device (nvjpeg), and the same plus the crop + resize there.
Photos: ~500×375 JPEG crops (quality 90) of scikit-learn's sample photos, or of smooth synthetic images without
scikit-learn. Usage: ``python bench/gpu_decode_probe.py [--n 512] [--batch 64]``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def photos(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEG-encoded ~500×375 photos (quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_sample_images

        sources = [Image.fromarray(p) for p in load_sample_images().images]
    except Exception:  # noqa: BLE001 - no scikit-learn on the machine: smooth synthetic scenes
        sources = []
        for _ in range(4):
            small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            sources.append(Image.fromarray(small).resize((640, 427), Image.BICUBIC))
    out = []
    for _ in range(n):
        src = sources[int(rng.integers(len(sources)))]
        w, h = (500, 375) if rng.random() < 0.8 else (375, 500)
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, max(1, src.height - h + 1)))
        buf = io.BytesIO()
        src.crop((x, y, x + w, y + h)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random-resized-crop box (scale 0.08–1, ratio 3/4–4/3) as (top, left, height, width)."""
    for _ in range(10):
        area = h * w * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w


def render(image: torch.Tensor, box: tuple[int, int, int, int], size: int = 224) -> torch.Tensor:
    """Crop ``image`` [3, H, W] uint8 to ``box`` and resize to ``size`` (bilinear, antialias), uint8."""
    top, left, h, w = box
    crop = image[:, top:top + h, left:left + w].unsqueeze(0)
    if crop.is_cuda:  # CUDA has no uint8 kernel: float, then back to uint8
        out = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out[0].round_().clamp_(0, 255).to(torch.uint8)
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def cpu_rate(data: list[bytes]) -> float:
    from PIL import Image

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for raw in data:
        arr = np.array(Image.open(io.BytesIO(raw)).convert("RGB"))
        image = torch.from_numpy(arr).permute(2, 0, 1)
        render(image, crop_box(*image.shape[1:], rng))
    return len(data) / (time.perf_counter() - t0)


def gpu_rate(data: list[bytes], batch: int, with_render: bool) -> float:
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in data]
    rng = np.random.default_rng(0)

    def one_pass() -> None:
        for i in range(0, len(tensors), batch):
            images = decode_jpeg(tensors[i:i + batch], mode=ImageReadMode.RGB, device="cuda")
            if with_render:
                torch.stack([render(img, crop_box(*img.shape[1:], rng)) for img in images])
        torch.cuda.synchronize()

    one_pass()  # warm-up: nvjpeg handles, kernels
    t0 = time.perf_counter()
    passes = 3
    for _ in range(passes):
        one_pass()
    return passes * len(data) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    data = photos(args.n)
    result = {"photos": args.n, "mean_kb": round(sum(map(len, data)) / len(data) / 1e3, 1),
              "cpu_decode_render_per_core": round(cpu_rate(data), 1)}
    if torch.cuda.is_available():
        result.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                      gpu_decode=round(gpu_rate(data, args.batch, False), 1),
                      gpu_decode_render=round(gpu_rate(data, args.batch, True), 1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""GPU check: what one GPU gets from e2kd, and that the student objective is right on CUDA.

Run: ``bench/gpu_check.sh`` on a GPU machine (≤ 8 min; writes ``bench/RESULTS-gpu.md``), or
``bench/gpu_check.sh --smoke [--out DIR]`` anywhere (CPU: ≤ 5 min on 2 cores; figures go to ``DIR``, by default a
temporary directory, never over ``bench/RESULTS-gpu.md``). The smoke size runs every step at toy sizes so a test
keeps the script from rotting; its figures say nothing about a GPU.

On any device:

a. **cache-teacher vs the bare teacher loop**: the whole stage (Ray, one actor with ``--decode-workers`` = cores − 2,
   JPEG photos decoded and rendered, ResNet-50 + GradCAM in bf16 at 224 px, encoded and committed) against the
   teacher's forward + GradCAM alone on the same views already on the device (goal ≥ 0.8×).
b. **train-student from that cache vs its floor vs online e²KD**, ResNet-50 → ResNet-18 at 224 px, ``--amp``, the
   real loader (``--workers`` = cores − 2): s/step from the cache, of the same step on batches already in memory
   (the floor; goal cache/floor ≤ 1.05) and with a live teacher (goal online/cached ≥ 2.5×).
c. **``e2kd demo --quick``**: its time, and on a GPU its results next to a CPU run of the same command (accuracy
   within 0.15 of the CPU's: one seed of two epochs, so only gross errors show).

On CUDA only: B-cos gradients on CUDA vs CPU float64, a timm ViT student's e²KD steps, and the student step alone
with cached vs live teacher targets (no data loading).

Prints one JSON document; exits 1 if a correctness check fails (performance goals are reported, not enforced).
Each check's result (or its error) is written to ``gpu_check.json`` and ``RESULTS-gpu.md`` as soon as it is known,
so a run cut short still leaves what it measured; ``--budget S`` skips the checks that would start after S seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))

from e2kd.explain import build_explainer  # noqa: E402
from e2kd.losses import E2KDObjective  # noqa: E402
from e2kd.models import create_model, input_transform  # noqa: E402

NARROW = {"channels": [16, 32, 64, 128], "stem_width": 16}
#: the sizes of checks a–c: on a GPU, and ``--smoke`` (toy sizes that run in minutes on 2 CPU cores)
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"size": 224, "shards": 8, "per_shard": 256, "teacher": ("resnet50", {}), "student": ("resnet18", {}),
            "batch": 64, "steps": 30, "precision": "bf16"},
    "smoke": {"size": 64, "shards": 2, "per_shard": 24, "teacher": ("resnet18", NARROW),
              "student": ("resnet18", {**NARROW, "channels": [8, 16, 32, 64], "stem_width": 8}), "batch": 8,
              "steps": 3, "precision": "fp32"},
}
DEMO_TOLERANCE = 0.15  # |GPU − CPU| accuracy of `demo --quick` (one seed, two epochs)


def _decode_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 2)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- a. cache-teacher stage vs the bare teacher loop ----------------------------------------------------------------
def stage_vs_bare(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Views/s of the whole cache-teacher stage and of the bare teacher loop on the same views (``--views full``)."""
    from bench_imagenet import make_photos

    from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher

    make_photos(work / "photos", cfg["shards"], cfg["per_shard"])
    urls = f"{work}/photos/photos-{{000000..{cfg['shards'] - 1:06d}}}.tar"
    cuda = torch.cuda.is_available()
    name, kwargs = cfg["teacher"]
    summary = run_cache_teacher(CacheTeacherOptions(
        data=urls, out=str(work / "cache"), teacher=name, teacher_kwargs=kwargs, num_classes=1000,
        random_teacher=True, input_size=cfg["size"], batch_size=cfg["batch"], actors=1,
        gpus_per_actor=1.0 if cuda else 0.0, threads_per_actor=1 if cuda else 2, decode_workers=_decode_workers(),
        precision=cfg["precision"], progress=False, overwrite=True))
    bare = bare_teacher_views_per_s(cfg, urls)
    stage = summary["samples_per_s"]
    return {"urls": urls, "decode_workers": _decode_workers(), "stage_views_per_s": stage,
            "stage_startup_s": summary["startup_seconds"], "bare_views_per_s": bare, "ratio": stage / bare,
            "goal": 0.8, "met": stage / bare >= 0.8}


def bare_teacher_views_per_s(cfg: dict[str, Any], urls: str) -> float:
    """Teacher forward + GradCAM alone, over the stage's views already rendered and on the device."""
    from e2kd.pipeline._sources import Sample, iter_shard, list_shards
    from e2kd.pipeline._views import FULL_VIEW, render_view_uint8
    from e2kd.stages._cache_teacher.worker import AUTOCAST_DTYPES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = (cfg["size"], cfg["size"])
    views = [render_view_uint8(s.image, FULL_VIEW.as_list(), size) for shard in list_shards(urls)
             for s in iter_shard(shard) if isinstance(s, Sample)]
    batches = [torch.stack(views[i:i + cfg["batch"]]).to(device) for i in range(0, len(views), cfg["batch"])]
    name, kwargs = cfg["teacher"]
    teacher = create_model(name, 1000, **kwargs).to(device).eval().requires_grad_(False)
    explainer, transform = build_explainer("gradcam", teacher), input_transform(teacher)
    dtype = AUTOCAST_DTYPES[cfg["precision"]]

    def run(batch: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            explainer(transform(batch))

    run(batches[0])
    _sync()
    t0 = time.perf_counter()
    for batch in batches:
        run(batch)
    _sync()
    return len(views) / (time.perf_counter() - t0)


# ---- b. train-student from the cache vs online e²KD --------------------------------------------------------------
def cached_vs_online(cfg: dict[str, Any], urls: str, work: Path) -> dict[str, Any]:
    """s/step of train-student with the real loader: targets from the cache of (a), then from a live teacher."""
    from e2kd.stages._train_student import TrainOptions, prepare_student
    from e2kd.training import OnlineTeacherTargets

    name, kwargs = cfg["student"]
    opts = TrainOptions(data=urls, cache=str(work / "cache"), student=name, student_kwargs=kwargs,
                        out=str(work / "run"), batch_size=cfg["batch"], lr=1e-3, temperature=4.0, lam=1.0,
                        amp=torch.cuda.is_available(), workers=_decode_workers(), progress=False, overwrite=True)
    run = prepare_student(opts)
    from e2kd.pipeline._train_stream import endless_batches

    trainer = run.trainer
    batches = endless_batches(trainer.stream, trainer.loader)
    cached = _loader_steps(trainer, batches, cfg["steps"])
    memory = [next(batches) for _ in range(cfg["steps"])]
    floor = _loader_steps(trainer, iter(memory * 2), cfg["steps"])  # the same step, batches already in memory
    cached = min(cached, _loader_steps(trainer, batches, cfg["steps"]))  # before and after the floor: best of two
    on_device = prepare_student(dataclasses.replace(opts, out=str(work / "run-decode-on-device"),
                                                    decode_on_device=True)).trainer  # JPEGs decoded by nvjpeg
    device_cached = _loader_steps(on_device, endless_batches(on_device.stream, on_device.loader), cfg["steps"])
    del on_device
    t_name, t_kwargs = cfg["teacher"]
    teacher = create_model(t_name, 1000, **t_kwargs).to(trainer.device)
    run.objective.targets = OnlineTeacherTargets(teacher, "gradcam")
    online = _loader_steps(trainer, batches, cfg["steps"])
    return {"batch": cfg["batch"], "steps": cfg["steps"], "workers": trainer.loader.loader.num_workers, "amp": opts.amp,
            "cached_s_per_step": cached, "floor_s_per_step": floor, "cache_over_floor": cached / floor,
            "floor_goal": 1.05, "decode_on_device_s_per_step": device_cached,
            "decode_on_device_over_floor": device_cached / floor, "online_s_per_step": online,
            "speedup": online / cached, "goal": 2.5, "met": online / cached >= 2.5}


def _loader_steps(trainer: Any, batches: Any, steps: int) -> float:
    """s/step over ``steps`` steps after two warm-up steps (``batches`` yields ``steps + 2`` at least)."""
    for _ in range(2):  # warm-up: allocator, kernels, the loader's first shard
        trainer.step(next(batches))
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(next(batches))
    _sync()
    return (time.perf_counter() - t0) / steps


# ---- c. the demo ---------------------------------------------------------------------------------------------------
def demo(work: Path) -> dict[str, Any]:
    """``e2kd demo --quick`` here (and on a GPU also with CUDA hidden): time and results of each."""
    runs = {"this device": demo_run(work / "demo", {})}
    if torch.cuda.is_available():
        runs["cpu"] = demo_run(work / "demo-cpu", {"CUDA_VISIBLE_DEVICES": ""})
    out: dict[str, Any] = {"runs": runs, "ok": all(r["returncode"] == 0 for r in runs.values())}
    if "cpu" in runs and out["ok"]:
        here, cpu = runs["this device"]["acc"], runs["cpu"]["acc"]
        out["max_abs_acc_diff"] = max(abs(here[k] - cpu[k]) for k in here)
        out["ok"] = out["max_abs_acc_diff"] <= DEMO_TOLERANCE
    return out


def demo_run(out: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "e2kd.cli", "demo", "--quick", "--out", str(out)],
                          env={**os.environ, **env}, capture_output=True, text=True)
    result: dict[str, Any] = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
        return result
    rows = json.loads((out / "results.json").read_text())
    result["acc"] = {f"{r['method']} {metric}": r[metric] for r in rows for metric in ("id_acc", "ood_acc")}
    return result


def _grads(model: torch.nn.Module, x: torch.Tensor, t_logits: torch.Tensor, t_maps: torch.Tensor,
           amp: bool = False) -> torch.Tensor:
    objective = E2KDObjective(model, "bcos", temperature=4.0, lam=1.0)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        total, _ = objective(x, t_logits, t_maps)
    grads = torch.autograd.grad(total, list(model.parameters()))
    return torch.cat([g.flatten().double().cpu() for g in grads])


def check_bcos(size: int) -> dict:
    torch.manual_seed(0)
    ref = create_model("bcos:resnet18", 10, norm="bn_uncentered_nobias", b=2, max_out=1, inplanes=32).double()
    gpu = create_model("bcos:resnet18", 10, norm="bn_uncentered_nobias", b=2, max_out=1, inplanes=32)
    gpu.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    gpu.cuda().train()
    ref.train()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, size, size, generator=g, dtype=torch.float64)
    x = input_transform(ref)(images)
    t_logits = torch.randn(8, 10, generator=g, dtype=torch.float64) * 3
    t_maps = torch.randn(8, 6, size, size, generator=g, dtype=torch.float64)
    expected = _grads(ref, x, t_logits, t_maps)
    fp32 = _grads(gpu, x.float().cuda(), t_logits.float().cuda(), t_maps.float().cuda())
    gpu.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})  # undo the BN statistics update
    bf16 = _grads(gpu, x.float().cuda(), t_logits.float().cuda(), t_maps.float().cuda(), amp=True)
    cos32 = float(F.cosine_similarity(fp32, expected, dim=0))
    cos16 = float(F.cosine_similarity(bf16, expected, dim=0))
    return {"bcos_grad_cosine_fp32_vs_cpu_fp64": cos32, "bcos_grad_cosine_bf16_vs_cpu_fp64": cos16,
            "bcos_bf16_finite": bool(torch.isfinite(bf16).all()),
            "ok": cos32 >= 0.9999 and cos16 >= 0.95 and bool(torch.isfinite(bf16).all())}


def check_vit() -> dict:
    torch.manual_seed(0)
    teacher = create_model("vit_small_patch16_224", 10).cuda().eval()
    student = create_model("vit_tiny_patch16_224", 10).cuda().train()
    images = torch.rand(16, 3, 224, 224, device="cuda")
    t_explainer = build_explainer("gradcam", teacher)
    objective = E2KDObjective(student, "gradcam", temperature=4.0, lam=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            t_maps, t_logits = t_explainer(input_transform(teacher)(images))
            total, _ = objective(input_transform(student)(images), t_logits, t_maps)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
    teacher_fused = any(getattr(m, "fused_attn", False) for m in teacher.modules())
    student_fused = any(getattr(m, "fused_attn", False) for m in student.modules())
    return {"vit_losses": [round(v, 4) for v in losses], "vit_teacher_fused_attention": teacher_fused,
            "vit_student_fused_attention": student_fused,
            "ok": losses[-1] < losses[0] and teacher_fused and not student_fused}


def _timed(step, batches: list, steps: int) -> float:
    for b in batches[:3]:
        step(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def time_steps(batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    teacher = create_model("resnet50", 1000).cuda().eval().requires_grad_(False)
    student = create_model("resnet18", 1000).cuda().train()
    t_explainer = build_explainer("gradcam", teacher)
    objective = E2KDObjective(student, "gradcam", temperature=4.0, lam=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    images = [torch.rand(batch, 3, 224, 224, device="cuda") for _ in range(4)]
    cached = []
    for x in images:  # what a cache holds: the teacher's logits and native 7×7 maps
        with torch.autocast("cuda", dtype=torch.bfloat16):
            maps, logits = t_explainer(input_transform(teacher)(x))
        cached.append((x, logits.float(), maps.float()))

    def student_step(item: tuple) -> None:
        x, t_logits, t_maps = item
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, _ = objective(input_transform(student)(x), t_logits, t_maps)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    def online_step(item: tuple) -> None:
        x = item[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            maps, logits = t_explainer(input_transform(teacher)(x))
        student_step((x, logits.float(), maps.float()))

    cached_s = _timed(student_step, cached, steps)
    online_s = _timed(online_step, cached, steps)
    cached_s = min(cached_s, _timed(student_step, cached, steps))  # cached measured before and after online
    return {"batch": batch, "steps": steps, "cached_s_per_step": cached_s, "online_s_per_step": online_s,
            "online_over_cached": online_s / cached_s, "ok": True}


def report(out: dict[str, Any], command: str) -> str:
    """The Markdown report of a run (of what it has measured so far)."""
    lines = ["## gpu-check", "", f"Command: `{command}`  ", f"Device: {out['device']}, {os.cpu_count()} CPU cores, "
             f"torch {out['torch']}; size `{out['size']}`; {time.strftime('%Y-%m-%d')}.", "",
             "| check | result |", "|---|---|"]
    a, b, c = out.get("stage", {}), out.get("train", {}), out.get("demo", {})
    if "ratio" in a:
        lines += [f"| a. cache-teacher stage (1 actor, {a['decode_workers']} decode workers) | "
                  f"{a['stage_views_per_s']:.1f} views/s (start-up {a['stage_startup_s']:.1f} s, not in the rate) |",
                  f"| a. bare teacher forward + GradCAM on the same views, on the device | "
                  f"{a['bare_views_per_s']:.1f} views/s |",
                  f"| **a. stage / bare** (goal ≥ 0.8×) | **{a['ratio']:.2f}×** ({'met' if a['met'] else 'not met'}) |"]
    if "speedup" in b:
        lines += [f"| b. train-student from the cache, real loader ({b['workers']} workers), batch {b['batch']}, "
                  f"amp {b['amp']} | {b['cached_s_per_step'] * 1e3:.1f} ms/step |",
                  f"| b. the same step on batches already in memory (floor) | "
                  f"{b['floor_s_per_step'] * 1e3:.1f} ms/step |",
                  f"| **b. cache / floor** (goal ≤ {b['floor_goal']}) | **{b['cache_over_floor']:.2f}** "
                  f"({'met' if b['cache_over_floor'] <= b['floor_goal'] else 'not met'}) |",
                  f"| b. the same with `--decode-on-device` (the workers read, the GPU decodes) | "
                  f"{b['decode_on_device_s_per_step'] * 1e3:.1f} ms/step: **{b['decode_on_device_over_floor']:.2f}** "
                  f"of the floor ({'met' if b['decode_on_device_over_floor'] <= b['floor_goal'] else 'not met'}) |",
                  f"| b. online e²KD (live teacher), same loader | {b['online_s_per_step'] * 1e3:.1f} ms/step |",
                  f"| **b. online / cached** (goal ≥ 2.5×) | **{b['speedup']:.2f}×** "
                  f"({'met' if b['met'] else 'not met'}) |"]
    for where, r in c.get("runs", {}).items():
        lines.append(f"| c. `e2kd demo --quick`, {where} | {r['seconds']:.0f} s, exit {r['returncode']} |")
    if "max_abs_acc_diff" in c:
        lines.append(f"| c. demo accuracies, this device vs CPU | max |Δ| {c['max_abs_acc_diff']:.3f} "
                     f"(≤ {DEMO_TOLERANCE}: {'yes' if c['ok'] else 'no'}) |")
    for name in ("bcos", "vit", "timing"):
        if name in out and "error" not in out[name]:
            lines.append(f"| {name} (CUDA only) | `{json.dumps({k: v for k, v in out[name].items()})}` |")
    for name, result in out.items():
        if isinstance(result, dict) and ("error" in result or "skipped" in result):
            lines.append(f"| {name} | {'error: ' + result['error'] if 'error' in result else result['skipped']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any device (figures mean nothing)")
    parser.add_argument("--out", default=None, help="directory for RESULTS-gpu.md and gpu_check.json (default: "
                        "bench/ on a GPU; with --smoke a new temporary directory)")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds after which no further check starts "
                        "(0: no limit)")
    parser.add_argument("--checks", default="", help="comma-separated subset of stage,train,timing,bcos,vit,demo "
                        "(train needs stage; default: all)")
    args = parser.parse_args()
    bench_dir = Path(__file__).resolve().parent
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check needs CUDA (or --smoke, which runs anywhere at toy sizes)")
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="e2kd-gpu-check-")) if args.smoke
                                               else bench_dir)
    if args.smoke and out_dir.resolve() == bench_dir:
        sys.exit("--smoke never writes over bench/RESULTS-gpu.md: give another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    size = "smoke" if args.smoke else "gpu"
    cfg = SIZES[size]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "size": size}
    command = " ".join(["bench/gpu_check.sh", *sys.argv[1:]])
    t0, checks = time.perf_counter(), {}

    def record(name: str, check: Any) -> None:
        """Run one check (unless the budget is spent), keep its result or its error, write what is known."""
        if args.checks and name not in args.checks.split(","):
            return
        if args.budget and time.perf_counter() - t0 > args.budget:
            out[name] = {"skipped": f"not started: past --budget {args.budget:g} s"}
        else:
            try:
                out[name] = check()
            except Exception as exc:  # noqa: BLE001 - a failed check is a result; the others still run
                out[name] = {"error": f"{type(exc).__name__}: {str(exc).strip()[-800:]}"}
        ok = out[name].get("ok", "error" not in out[name] and "skipped" not in out[name])
        checks[name] = bool(ok) or "skipped" in out[name]
        (out_dir / "gpu_check.json").write_text(json.dumps(out, indent=1))
        (out_dir / "RESULTS-gpu.md").write_text(report(out, command))
        print(f"[{time.perf_counter() - t0:.0f} s] {name}: {json.dumps(out[name])[:400]}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="e2kd-gpu-check-work-") as tmp:
        work = Path(tmp)
        record("stage", lambda: stage_vs_bare(cfg, work))
        if "urls" in out.get("stage", {}):
            record("train", lambda: cached_vs_online(cfg, out["stage"]["urls"], work))
        if torch.cuda.is_available():
            record("timing", lambda: time_steps(64, 20))
            record("bcos", lambda: check_bcos(96))
            record("vit", check_vit)
        record("demo", lambda: demo(work))
    print(json.dumps(out, indent=1))
    print(f"written: {out_dir / 'RESULTS-gpu.md'}", file=sys.stderr)
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()

"""GPU check of the student objective (needs CUDA; ``bench/gpu_check.sh`` runs it on a lent GPU machine).

On one CUDA device:
1. **B-cos gradients**: the paper's B-cos student (``norm="bn_uncentered_nobias"``): E2KDObjective's gradient
   on CUDA in float32 equals the CPU float64 gradient (cosine ≥ 0.9999); under bf16 autocast it stays finite
   and close (cosine ≥ 0.95).
2. **ViT student**: a timm ViT student takes E2KDObjective steps (double backward through the non-fused
   attention) while its teacher explains with fused attention.
3. **Step time** at 224 px, bf16, ResNet-50 → ResNet-18 GradCAM: cached e²KD (student step only) vs online
   e²KD (teacher forward + GradCAM, then the same student step), side by side on the same batches.

Prints one JSON document; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from e2kd.explain import build_explainer
from e2kd.losses import E2KDObjective
from e2kd.models import create_model, input_transform


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs CUDA")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    checks = {"bcos": check_bcos(96), "vit": check_vit(), "timing": time_steps(args.batch, args.steps)}
    out.update(checks)
    print(json.dumps(out, indent=1))
    sys.exit(0 if all(c["ok"] for c in checks.values()) else 1)


if __name__ == "__main__":
    main()

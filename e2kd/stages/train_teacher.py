"""``e2kd train-teacher``: plain supervised training of a teacher (same loader and timm factories as students)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from e2kd.models import create_model, input_transform, model_spec
from e2kd.pipeline.loader import StreamSpec, build_loader, plan_join
from e2kd.pipeline.sources import list_shards
from e2kd.stages.evaluate import evaluate_student

__all__ = ["TeacherOptions", "train_teacher"]


@dataclass
class TeacherOptions:
    """Options of ``train-teacher``."""

    data: str
    model: str
    num_classes: int
    out: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    epochs: int = 25
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.7, 1.0)
    flip_p: float = 0.0
    val_data: str | None = None
    workers: int = 0
    seed: int = 0
    progress: bool = True


def train_teacher(opts: TeacherOptions) -> dict[str, Any]:
    """Train on labelled shards; write ``OUT/teacher.safetensors``, ``metrics.jsonl`` and ``summary.json``."""
    from safetensors.torch import save_file
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from tqdm import tqdm

    shards = list_shards(opts.data)
    keys = {k: v for k, v in plan_join(shards, None).keys.items() if v >= 0}
    steps = len(keys) // opts.batch_size
    if steps < 1:
        raise ValueError(f"{len(keys)} labelled samples are fewer than one batch of {opts.batch_size}")
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    model = create_model(opts.model, opts.num_classes, **opts.model_kwargs).train()
    transform = input_transform(model)
    optimizer = create_optimizer_v2(model, opt=opts.opt, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=opts.sched, num_epochs=opts.epochs,
                                       warmup_epochs=opts.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps)
    stream, loader = build_loader(StreamSpec(shards=shards, keys=set(keys), input_size=(opts.input_size,) * 2,
                                             crop_scale=tuple(opts.crop_scale), flip_p=opts.flip_p, seed=opts.seed),
                                  opts.batch_size, opts.workers)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    updates, metrics = 0, {}
    for epoch in range(opts.epochs):
        stream.set_epoch(epoch)
        it, total, t0 = iter(loader), 0.0, time.time()
        for _ in tqdm(range(steps), desc=f"teacher epoch {epoch + 1}/{opts.epochs}", leave=False,
                      disable=not opts.progress):
            batch = next(it)
            loss = F.cross_entropy(model(transform(batch["image"])), batch["label"],
                                   label_smoothing=opts.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            total += float(loss.detach())
        del it
        metrics = {"epoch": epoch + 1, "loss": total / steps, "sec_per_epoch": time.time() - t0}
        if opts.val_data:
            metrics.update(evaluate_student(model, opts.val_data, None, None, opts.input_size, opts.batch_size))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "teacher.safetensors"))
    summary = {"teacher": model_spec(model), "final": metrics, "options": json.loads(json.dumps(asdict(opts)))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

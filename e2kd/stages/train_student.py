"""``e2kd train-student``: KD + λ·explanation loss from cached teacher outputs, the teacher never built.

Checks the cache against the run before anything is written, then trains with timm's optimiser and
scheduler factories, checkpoints every epoch (resumable), and writes ``student.safetensors``,
``metrics.jsonl`` and ``summary.json`` into the run directory. Under ``torchrun`` ranks read disjoint
shards, run the same number of steps per epoch and average gradients; only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from e2kd.explain import explainer_family
from e2kd.losses import EXPL_RESOLUTIONS, E2KDObjective
from e2kd.models import create_model, input_transform, model_spec
from e2kd.pipeline.loader import StreamSpec, build_loader, plan_join, select_shots
from e2kd.pipeline.sources import list_shards
from e2kd.stages.evaluate import evaluate_student
from e2kd.stages.targets import CachedTargets, OnlineTeacherTargets

__all__ = ["TrainOptions", "train_student", "CompatibilityError"]


class CompatibilityError(ValueError):
    """The cache does not fit the run (one line, naming the field)."""


@dataclass
class TrainOptions:
    """Options of ``train-student`` (CLI flags and YAML keys share these names)."""

    data: str
    student: str
    out: str
    cache: str | None = None
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    student_init: str | None = None
    num_classes: int | None = None
    explainer: str | None = None
    input_size: int | None = None
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int = 0
    clip_grad: float | None = 1.0
    lam: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    expl_resolution: str = "input"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.0
    shots: int | None = None
    shot_seed: int = 0
    val_data: str | None = None
    val_cache: str | None = None
    workers: int = 0
    amp: bool = False
    resume: bool = False
    allow_missing: bool = False
    seed: int = 0
    online_teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.cache is None) == (self.online_teacher is None):
            raise ValueError("give exactly one of --cache (train from a cache) or --online-teacher (live baseline)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be >= 1")
        if self.lam < 0 or self.temperature <= 0:
            raise ValueError("--lambda must be >= 0 and --temperature > 0")
        _check_ranges(self)
        if self.expl_resolution not in EXPL_RESOLUTIONS:
            raise ValueError(f"--expl-resolution must be one of {', '.join(EXPL_RESOLUTIONS)}, "
                             f"got {self.expl_resolution!r}")


def _check_ranges(o: TrainOptions) -> None:
    """Every option's range, checked up front — also where a value would be ignored."""
    from e2kd.config import check_crop_scale, check_range

    check_crop_scale(tuple(o.crop_scale))
    check_range("--flip-p", o.flip_p, 0, 1)
    check_range("--input-size", o.input_size, 8)
    for flag, value in (("--steps-per-epoch", o.steps_per_epoch), ("--shots", o.shots),
                        ("--num-classes", o.num_classes)):
        check_range(flag, value, 1)
    check_range("--lr", o.lr, 0, exclusive_lo=True)
    for flag, value in (("--weight-decay", o.weight_decay), ("--warmup-epochs", o.warmup_epochs),
                        ("--clip-grad", o.clip_grad), ("--ce-weight", o.ce_weight), ("--workers", o.workers)):
        check_range(flag, value, 0)
    if o.warmup_epochs >= o.epochs and o.warmup_epochs > 0:
        raise ValueError(f"--warmup-epochs {o.warmup_epochs} must be fewer than --epochs {o.epochs}")
    if o.val_cache and not o.val_data:
        raise ValueError("--val-cache needs --val-data")


# ---- set-up and compatibility ----------------------------------------------------------------------
def resolve_against_cache(opts: TrainOptions, manifest: dict[str, Any]) -> TrainOptions:
    """Fill class count / explainer / input size from the manifest; explicit values must agree with it."""
    cache_classes = manifest["teacher"]["num_classes"]
    if opts.num_classes is not None and opts.num_classes != cache_classes:
        raise CompatibilityError(f"num_classes: the student has {opts.num_classes} classes, the cache's teacher "
                                 f"{cache_classes}")
    family = manifest["explainer"]["family"]
    explainer = opts.explainer or manifest["explainer"]["name"]
    if explainer_family(explainer) != family:
        raise CompatibilityError(f"explainer: the cache holds {family} maps, which cannot supervise a {explainer} "
                                 f"student explanation")
    size = manifest["preprocessing"]["input_size"][0]
    if opts.input_size is not None and opts.input_size != size and manifest["views"]["policy"] != "full":
        raise CompatibilityError(f"input_size: the cache's views were rendered at {size} px, the student asks for "
                                 f"{opts.input_size} (view replay needs the same size)")
    incomplete = [n for n, r in manifest["shards"].items() if not r["complete"]]
    if incomplete or manifest.get("map_shape") is None:
        raise CompatibilityError(f"cache: incomplete store (shards {incomplete[:3]}); finish it with the same "
                                 f"cache-teacher command")
    opts.num_classes, opts.explainer = cache_classes, explainer
    opts.input_size = opts.input_size or size
    return opts


def _open_cache(uri: str) -> Any:
    from e2kd.storage import ManifestError, open_store

    try:
        return open_store(uri)
    except (ManifestError, FileNotFoundError) as exc:
        raise CompatibilityError(f"cache: {exc}") from None


def _check_validation_inputs(opts: TrainOptions) -> None:
    """``--val-data`` / ``--val-cache`` fail here, before the first step, not after an epoch."""
    if not opts.val_data:
        return
    val_store = _open_cache(opts.val_cache) if opts.val_cache else None
    if val_store is not None and val_store.manifest["teacher"]["num_classes"] != opts.num_classes:
        raise CompatibilityError(f"--val-cache: its teacher has {val_store.manifest['teacher']['num_classes']} "
                                 f"classes, the student {opts.num_classes}")
    try:
        plan_join(list_shards(opts.val_data), val_store)
    except ValueError as exc:
        raise ValueError(f"--val-data: {exc}") from None


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    opts: TrainOptions
    model: torch.nn.Module
    objective: E2KDObjective
    targets: Any
    optimizer: Any
    scheduler: Any
    stream: Any
    loader: Any
    steps_per_epoch: int
    rank: int
    world: int
    device: torch.device
    plan: Any
    cache_identity: dict[str, Any] | None
    transform: Any = None  # the student's input transform, resolved once


def _build(opts: TrainOptions) -> _Run:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    rank, world = _distributed()
    store = None
    if opts.cache is not None:
        store = _open_cache(opts.cache)
        opts = resolve_against_cache(opts, store.manifest)
    elif opts.num_classes is None or opts.explainer is None or opts.input_size is None:
        raise ValueError("--online-teacher needs --num-classes, --explainer and --input-size")
    shards = list_shards(opts.data)
    plan = plan_join(shards, store, opts.allow_missing)
    _check_validation_inputs(opts)
    keys = select_shots(plan.keys, opts.shots, opts.shot_seed) if opts.shots else plan.keys
    per_step = opts.batch_size * world
    steps = opts.steps_per_epoch or len(keys) // per_step
    if steps < 1:
        raise ValueError(f"{len(keys)} usable samples are fewer than one step of {per_step} "
                         f"(batch {opts.batch_size} × {world} rank(s)); lower --batch-size")
    if len(shards) < world:
        raise ValueError(f"{len(shards)} input shard(s) for {world} ranks: every rank needs at least one shard")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    _seed_everything(opts.seed)
    model = create_model(opts.student, opts.num_classes, checkpoint=opts.student_init, **opts.student_kwargs)
    model.to(device).train()
    if world > 1:
        for p in model.state_dict().values():
            torch.distributed.broadcast(p, 0)
    targets = CachedTargets() if store is not None else OnlineTeacherTargets(
        create_model(opts.online_teacher, opts.num_classes, checkpoint=opts.teacher_checkpoint,
                     **opts.teacher_kwargs).to(device), opts.explainer, with_maps=opts.lam > 0)
    optimizer = create_optimizer_v2(model, opt=opts.opt, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=opts.sched, num_epochs=opts.epochs,
                                       warmup_epochs=opts.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=steps)
    spec = StreamSpec(shards=shards, keys=set(keys), input_size=(opts.input_size, opts.input_size),
                      cache_uri=opts.cache, crop_scale=tuple(opts.crop_scale), flip_p=opts.flip_p, seed=opts.seed,
                      rank=rank, world_size=world,
                      map_size=(opts.input_size, opts.input_size) if opts.expl_resolution == "input" else None)
    stream, loader = build_loader(spec, opts.batch_size, opts.workers)
    identity = None
    if store is not None:
        m = store.manifest
        identity = {"uri": opts.cache, "teacher": m["teacher"], "explainer": m["explainer"], "views": m["views"],
                    "inputs_fingerprint": m["inputs"]["fingerprint"],
                    "shards_sha256": {n: r["sha256"] for n, r in sorted(m["shards"].items())}}
    objective = E2KDObjective(model, opts.explainer, temperature=opts.temperature, lam=opts.lam,
                              ce_weight=opts.ce_weight, expl_resolution=opts.expl_resolution)
    return _Run(opts, model, objective, targets, optimizer, scheduler, stream, loader, steps, rank, world, device,
                plan, identity, input_transform(model))


def _step(run: _Run, batch: dict[str, Any]) -> dict[str, float]:
    images = batch["image"].to(run.device)
    t_logits, t_maps, targets = run.targets(batch, run.device)
    x = run.transform(images)
    autocast = torch.autocast(device_type=run.device.type, dtype=torch.bfloat16,
                              enabled=run.opts.amp and run.device.type == "cuda")  # --amp is a GPU option
    with autocast:
        total, parts = run.objective(x, t_logits, t_maps if run.opts.lam > 0 else None, batch["label"].to(run.device),
                                     targets=targets)
    parts = {k: float(v.detach()) for k, v in parts.items()}
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss {float(total.detach())} (parts {parts})")
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if run.world > 1:
        for p in run.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= run.world
    if run.opts.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.opts.clip_grad)
    run.optimizer.step()
    return {"loss": float(total.detach()), **parts}


def _train_epoch(run: _Run, epoch: int, num_updates: int) -> tuple[dict[str, float], int]:
    from tqdm import tqdm

    run.model.train()
    run.stream.set_epoch(epoch)
    sums: dict[str, float] = {}
    seen, t0 = 0, time.time()
    it = iter(run.loader)
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{run.opts.epochs}", leave=False,
               disable=not run.opts.progress or run.rank != 0, dynamic_ncols=True)
    for _ in bar:
        batch = next(it)
        out = _step(run, batch)
        num_updates += 1
        run.scheduler.step_update(num_updates=num_updates)
        seen += len(batch["image"])
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{out['loss']:.4f}")
    del it
    elapsed = time.time() - t0
    metrics = {k: v / run.steps_per_epoch for k, v in sums.items()}
    metrics.update(samples_per_s=seen * run.world / elapsed, sec_per_epoch=elapsed,
                   lr=run.optimizer.param_groups[0]["lr"])
    return metrics, num_updates


def _checkpoint(run: _Run, out: Path, epoch: int, num_updates: int) -> None:
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "epoch": epoch, "num_updates": num_updates,
             "torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()[1]),
             "python_rng_version": random.getstate()[0], "options": json.dumps(asdict(run.opts), default=str)}
    tmp = out / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "checkpoint.pt")


def _restore(run: _Run, out: Path) -> tuple[int, int]:
    path = out / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    state = torch.load(path, map_location=run.device, weights_only=True)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    random.setstate((state["python_rng_version"], tuple(state["python_rng"]), None))
    _truncate_metrics(out / "metrics.jsonl", state["epoch"])
    return state["epoch"], state["num_updates"]


def _last_metrics(path: Path) -> dict[str, float]:
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return {k: v for k, v in lines[-1].items() if k not in ("epoch", "steps")} if lines else {}


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["epoch"] <= epochs_done))


def _validate(run: _Run) -> dict[str, float]:
    if not run.opts.val_data:
        return {}
    return evaluate_student(run.model, run.opts.val_data, run.opts.val_cache, run.opts.explainer,
                            run.opts.input_size, batch_size=run.opts.batch_size, workers=run.opts.workers,
                            expl_resolution=run.opts.expl_resolution)


def train_student(opts: TrainOptions) -> dict[str, Any]:
    """Train a student; return the summary written to ``RUN_DIR/summary.json``.

    Raises:
        CompatibilityError: the cache does not fit (nothing is written to the run directory).
    """
    run = _build(opts)
    out = Path(opts.out)
    start_epoch, num_updates = 0, 0
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if opts.resume and (out / "checkpoint.pt").exists():
        start_epoch, num_updates = _restore(run, out)
    elif run.rank == 0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    metrics = _last_metrics(out / "metrics.jsonl") if start_epoch else {}  # a finished run resumed keeps its final
    for epoch in range(start_epoch, opts.epochs):
        metrics, num_updates = _train_epoch(run, epoch, num_updates)
        if run.rank == 0:
            metrics.update(_validate(run))
            line = {"epoch": epoch + 1, "steps": num_updates, **metrics}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            _checkpoint(run, out, epoch + 1, num_updates)
        if run.world > 1:
            torch.distributed.barrier()
    return _finish(run, out, metrics, num_updates)


def _finish(run: _Run, out: Path, metrics: dict[str, float], num_updates: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    summary = {"student": model_spec(run.model), "cache": run.cache_identity, "online_teacher": run.opts.online_teacher,
               "explainer": run.opts.explainer, "expl_resolution": run.opts.expl_resolution,
               "input_size": run.opts.input_size, "epochs": run.opts.epochs,
               "steps": num_updates, "steps_per_epoch": run.steps_per_epoch, "world_size": run.world,
               "samples": run.plan.num_samples, "skipped_cache_bad": run.plan.cache_bad,
               "skipped_missing": len(run.plan.missing_in_cache), "final": metrics,
               "options": json.loads(json.dumps(asdict(run.opts), default=str))}
    if run.rank == 0:
        state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
        save_file(state, str(out / "student.safetensors"))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if run.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


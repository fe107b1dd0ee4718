"""``e2kd train-student``: KD + λ·explanation loss from cached teacher outputs, the teacher never built.

Checks the cache against the run before anything is written, then trains with timm's optimiser and
scheduler factories, checkpoints every epoch (resumable), and writes ``student.safetensors``,
``metrics.jsonl`` and ``summary.json`` into the run directory. Under ``torchrun`` ranks read disjoint
shards, run the same number of steps per epoch and average gradients; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from e2kd.losses import E2KDObjective
from e2kd.models import create_model, model_spec
from e2kd.pipeline._device_images import DeviceImages
from e2kd.pipeline._loader import JoinPlan, StreamSpec, plan_join, select_shots
from e2kd.pipeline._sources import list_shards
from e2kd.pipeline._student_cache import open_student_cache, open_student_caches, parse_cache_weights
from e2kd.pipeline._train_stream import build_train_loader
from e2kd.stages._options import TrainOptions
from e2kd.storage import CacheStore, CompatibilityError, Manifest
from e2kd.storage._local_cache import LocalCache
from e2kd.storage._options import apply_storage_options, describe_storage_options, resolve_storage_options
from e2kd.training import (
    CachedTargets,
    OnlineTeacherTargets,
    StudentObjective,
    Trainer,
    build_optimizer,
    check_run_dir,
    evaluate_model,
    init_distributed,
)
from e2kd.training._loop import order_record, seed_everything, training_order

__all__ = ["TrainOptions", "StudentRun", "prepare_student", "train_student", "CompatibilityError"]


# ---- set-up and compatibility ----------------------------------------------------------------------
def cache_list(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``--cache`` (or ``--expect-cache-id``) as a list: one entry per teacher."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def resolve_against_caches(opts: TrainOptions, uris: list[str]) -> tuple[TrainOptions, list[CacheStore]]:
    """Open the run's caches (one per teacher) and check that they fit the student and join
    (:func:`open_student_caches`); class count / explainer / input size default to theirs."""
    if len(uris) == 1:
        opts, store = resolve_against_cache(opts, uris[0])
        return opts, [store]
    opened = open_student_caches(uris, expect_ids=cache_list(opts.expect_cache_id), num_classes=opts.num_classes,
                                 explainer=opts.explainer, input_size=opts.input_size, temperature=opts.temperature,
                                 expl_field=opts.expl_field)
    parse_cache_weights(opts.cache_weights, len(uris))  # checked before any work
    first = opened[0]
    opts.num_classes, opts.explainer, opts.input_size = first.num_classes, first.explainer, first.input_size
    _warn_ignored_augmentation(opts, first.store.manifest)
    return opts, [o.store for o in opened]


def _join_plan(plan: JoinPlan, stores: list[CacheStore], uris: list[str], allow_missing: bool) -> None:
    """Several teachers' caches must hold the same keys per shard (the same inputs); with ``allow_missing`` keys
    not in every cache are dropped from the plan."""
    first = stores[0]
    for other, uri in zip(stores[1:], uris[1:], strict=True):
        for name in plan.shard_counts:
            mine = set(first.shard_keys(name)) if name in first.shard_names else set()
            theirs = set(other.shard_keys(name)) if name in other.shard_names else set()
            if mine == theirs:
                continue
            if not allow_missing:
                example = sorted(mine ^ theirs)[0]
                raise ValueError(f"--cache {uri}: shard {name} holds other keys than --cache {uris[0]} (e.g. "
                                 f"{example!r}): the caches are not of the same inputs (--allow-missing skips such "
                                 f"keys)")
            for key in mine - theirs:
                plan.keys.pop(key, None)


def resolve_against_cache(opts: TrainOptions, uri: str) -> tuple[TrainOptions, CacheStore]:
    """Open the cache for this run (:func:`open_student_cache`): class count / explainer / input size default to
    the cache's, explicit values must agree with it."""
    expect = cache_list(opts.expect_cache_id)
    if len(expect) > 1:
        raise CompatibilityError(f"--expect-cache-id is given {len(expect)} times for 1 cache")
    opened = open_student_cache(uri, expect_id=expect[0] if expect else None, num_classes=opts.num_classes,
                                explainer=opts.explainer, input_size=opts.input_size, temperature=opts.temperature,
                                expl_field=opts.expl_field)
    opts.num_classes, opts.explainer, opts.input_size = opened.num_classes, opened.explainer, opened.input_size
    _warn_ignored_augmentation(opts, opened.store.manifest)
    return opts, opened.store


def _warn_ignored_augmentation(opts: TrainOptions, manifest: Manifest) -> None:
    """``--crop-scale`` / ``--flip-p`` act on a ``full`` cache only: with a K-view cache the cached views are
    replayed exactly, so values other than the defaults are ignored — say so instead of silently."""
    import warnings

    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    changed = [flag for flag, name in (("--crop-scale", "crop_scale"), ("--flip-p", "flip_p"))
               if tuple(_as_list(getattr(opts, name))) != tuple(_as_list(defaults[name]))]
    if manifest.replays_views and changed:
        warnings.warn(f"{' and '.join(changed)} ignored: the cache holds {manifest.num_views} views per sample, "
                      f"which the student replays exactly (drawn with crop scale {manifest.views.get('scale')}, "
                      f"flip p {manifest.views.get('flip_p')})", UserWarning, stacklevel=2)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def recorded_options(opts: Any) -> dict[str, Any]:
    """The options as a run records them (summary, checkpoint): storage options by key name only (secrets)."""
    out = json.loads(json.dumps(asdict(opts), default=str))
    if "storage_options" in out:
        out["storage_options"] = describe_storage_options(opts.storage_options)
    return out


def _check_validation_inputs(opts: TrainOptions) -> None:
    """``--val-data`` / ``--val-cache`` fail here, before the first step, not after an epoch."""
    if not opts.val_data:
        return
    val_store = open_student_cache(opts.val_cache, expl_field=opts.expl_field, what="--val-cache").store \
        if opts.val_cache else None
    if val_store is not None and val_store.manifest.num_classes != opts.num_classes:
        raise CompatibilityError(f"--val-cache: its teacher has {val_store.manifest.num_classes} "
                                 f"classes, the student {opts.num_classes}")
    try:
        plan_join(list_shards(opts.val_data), val_store, labels=False)
    except ValueError as exc:
        raise ValueError(f"--val-data: {exc}") from None


def _cache_identity(uri: str, store: Any) -> dict[str, Any]:
    """What the summary records about the cache a student learnt from."""
    m = store.manifest
    return {"uri": uri, "cache_id": store.cache_id, "teacher": m.teacher, "explainer": m.explainer, "views": m.views,
            "class_names": list(m.class_names) if m.class_names else None,
            "inputs_fingerprint": m.inputs["fingerprint"],
            "shards_sha256": {n: r.sha256 for n, r in sorted(m.shards.items())}}


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class StudentRun:
    """A prepared student run: the trainer (``trainer.step(batch)``, ``trainer.loader``), its objective
    (``objective.targets`` can be swapped, e.g. for a live teacher in benchmarks) and the join plan."""

    opts: TrainOptions
    trainer: Trainer
    objective: StudentObjective
    plan: JoinPlan
    cache_identity: dict[str, Any] | None  # the (first) cache's
    cache_identities: list[dict[str, Any]] = field(default_factory=list)  # every teacher's cache, in --cache order


def prepare_student(opts: TrainOptions) -> StudentRun:
    """Check the cache against the options and build model, objective, optimiser and stream; nothing is written.

    Raises:
        CompatibilityError: the cache does not fit the run.
        ValueError: the data, keys or options do not allow one step.
    """
    check_run_dir(Path(opts.out), opts.resume, opts.overwrite)
    rank, world = init_distributed()
    caches = cache_list(opts.cache)
    apply_storage_options(resolve_storage_options(opts.storage_options, [opts.data, *caches, opts.val_data,
                                                                         opts.val_cache]))
    store: CacheStore | None = None
    stores: list[CacheStore] = []
    if caches:
        opts, stores = resolve_against_caches(opts, caches)
        store = stores[0]
    elif opts.num_classes is None or opts.explainer is None or opts.input_size is None:
        raise ValueError("--online-teacher needs --num-classes, --explainer and --input-size")
    num_classes, explainer, size = _settled(opts)
    shards = list_shards(opts.data)
    plan = plan_join(shards, store, opts.allow_missing, labels=bool(opts.shots))
    if len(stores) > 1:
        _join_plan(plan, stores, caches, opts.allow_missing)
    if plan.unused_cache_shards:
        import warnings

        warnings.warn(f"{len(plan.unused_cache_shards)} cached shard(s) are not in --data and go unused (e.g. "
                      f"{plan.unused_cache_shards[:3]}); train on a subset deliberately, or give every input shard",
                      UserWarning, stacklevel=2)
    _check_validation_inputs(opts)
    keys = select_shots(plan.keys, opts.shots, opts.shot_seed) if opts.shots else plan.keys
    per_step = opts.batch_size * world
    if not keys or (len(keys) < per_step and not opts.steps_per_epoch):
        raise ValueError(f"{len(keys)} usable samples are fewer than one step of {per_step} "
                         f"(batch {opts.batch_size} × {world} rank(s)); lower --batch-size" if keys else
                         "no usable samples: every input sample was skipped or is missing from the cache")
    local_cache = LocalCache.create(opts.local_cache, opts.local_cache_gb) if opts.local_cache else None
    order = training_order(plan.keys_by_shard(keys if opts.shots else None), opts.seed, opts.batch_size, world,
                           opts.workers, opts.partitions, Path(opts.out) if opts.resume else None)
    steps = opts.steps_per_epoch or order.steps_per_pass
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    seed_everything(opts.seed)
    model = create_model(opts.student, num_classes, checkpoint=opts.student_init, **opts.student_kwargs)
    model.to(device).train()
    if world > 1:
        for p in model.state_dict().values():
            torch.distributed.broadcast(p, 0)
    targets = CachedTargets() if store is not None else OnlineTeacherTargets(
        create_model(opts.online_teacher or "", num_classes, checkpoint=opts.teacher_checkpoint,
                     **opts.teacher_kwargs).to(device), explainer, with_maps=opts.lam > 0)
    optimizer, scheduler = build_optimizer(model, opt=opts.opt, lr=opts.lr, weight_decay=opts.weight_decay,
                                           sched=opts.sched, epochs=opts.epochs, warmup_epochs=opts.warmup_epochs,
                                           steps_per_epoch=steps)
    spec = StreamSpec(shards=shards, keys=set(keys), input_size=(size, size),
                      cache_uri=caches[0] if caches else None, extra_cache_uris=tuple(caches[1:]),
                      cache_shards=tuple(tuple(s.shard_names) for s in stores) if stores else None,
                      crop_scale=(opts.crop_scale[0], opts.crop_scale[1]), flip_p=opts.flip_p, seed=opts.seed,
                      rank=rank, world_size=world, trusted=frozenset(plan.trusted), allow_missing=opts.allow_missing,
                      expl_field=opts.expl_field,
                      map_size=(size, size) if opts.expl_resolution == "input" else None,
                      local_cache=local_cache, decode_on_device=opts.decode_on_device)
    stream, rank_loader = build_train_loader(spec, order, steps, opts.workers)
    loader = DeviceImages(rank_loader, device, spec.input_size) if opts.decode_on_device else rank_loader
    weights = parse_cache_weights(opts.cache_weights, len(caches)) if len(caches) > 1 else None
    objective = StudentObjective(E2KDObjective(model, explainer, temperature=opts.temperature, lam=opts.lam,
                                               ce_weight=opts.ce_weight, expl_resolution=opts.expl_resolution,
                                               teacher_weights=weights), targets)
    trainer = Trainer(model, objective, optimizer, scheduler, stream, loader, steps, opts.epochs, device, rank, world,
                      clip_grad=opts.clip_grad, amp=opts.amp, progress=opts.progress,
                      validate=(lambda: _validate(model, opts)) if opts.val_data else None,
                      options=recorded_options(opts), order=order_record(order),
                      checkpoint_every=opts.checkpoint_every,
                      trace_keys=Path(opts.trace_keys) if opts.trace_keys else None,
                      tensorboard=Path(opts.tensorboard) if opts.tensorboard else None,
                      snapshot=_snapshot(objective) if opts.tensorboard else None)
    identities = [_cache_identity(uri, s) for uri, s in zip(caches, stores, strict=True)]
    return StudentRun(opts, trainer, objective, plan, identities[0] if identities else None, identities)


def _snapshot(objective: StudentObjective) -> Any:
    """A batch → the images TensorBoard shows per epoch: its first images, the teacher's maps (from the cache; the
    first teacher's where there are several) and the student's of the last step (rank 0's part of that batch)."""
    from e2kd.pipeline._loader import teacher_maps
    from e2kd.training._tensorboard import explanation_images

    def snapshot(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        teacher = teacher_maps(batch, torch.device("cpu")) if "t_map" in batch else None
        teacher = teacher[0] if isinstance(teacher, list) else teacher
        return explanation_images(batch, objective.objective.last_maps, teacher)

    return snapshot


def _settled(opts: TrainOptions) -> tuple[int, str, int]:
    """The class count, explainer and input size, given or taken from the cache by now."""
    if opts.num_classes is None or opts.explainer is None or opts.input_size is None:
        raise ValueError("the class count, explainer and input size are neither given nor known from the cache")
    return opts.num_classes, opts.explainer, opts.input_size


def _validate(model: torch.nn.Module, opts: TrainOptions) -> dict[str, float]:
    _, explainer, size = _settled(opts)
    return evaluate_model(model, opts.val_data or "", opts.val_cache, explainer, size,
                          batch_size=opts.batch_size, workers=opts.workers, expl_resolution=opts.expl_resolution,
                          expl_field=opts.expl_field)


def train_student(opts: TrainOptions) -> dict[str, Any]:
    """Train a student; return the summary written to ``RUN_DIR/summary.json``.

    Raises:
        CompatibilityError: the cache does not fit (nothing is written to the run directory).
    """
    run = prepare_student(opts)
    out = Path(opts.out)
    metrics, num_updates = run.trainer.fit(out, resume=opts.resume)
    return _finish(run, out, metrics, num_updates)


def _finish(run: StudentRun, out: Path, metrics: dict[str, float], num_updates: int) -> dict[str, Any]:
    trainer = run.trainer
    summary = {"student": model_spec(trainer.model), "cache": run.cache_identity,
               "cache_ids": [c["cache_id"] for c in run.cache_identities],
               **({"caches": run.cache_identities, "cache_weights": run.objective.objective.teacher_weights}
                  if len(run.cache_identities) > 1 else {}),
               "online_teacher": run.opts.online_teacher, "explainer": run.opts.explainer,
               "expl_resolution": run.opts.expl_resolution, "input_size": run.opts.input_size,
               "epochs": run.opts.epochs, "steps": num_updates, "steps_per_epoch": trainer.steps_per_epoch,
               "world_size": trainer.world, "samples": run.plan.num_samples, "skipped_cache_bad": run.plan.cache_bad,
               "skipped_missing": len(run.plan.missing_in_cache), "final": metrics,
               "options": recorded_options(run.opts)}
    trainer.save_weights(out / "student.safetensors")
    if trainer.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if trainer.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary

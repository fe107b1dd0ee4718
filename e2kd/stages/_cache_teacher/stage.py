"""``e2kd cache-teacher``: run a teacher once over a dataset with Ray actors and write a verified cache.

Flow: plan input shards → lock the store → (resume) skip complete shards → Ray actors (one teacher each)
each write and commit whole shards → the driver records each finished shard in the manifest (atomic
replace), so the store is consistent at every instant and a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from e2kd import __version__
from e2kd.explain import build_explainer
from e2kd.models import InputTransform
from e2kd.pipeline._sources import (
    FolderShard,
    InputShard,
    class_names,
    input_size_bytes,
    list_shards,
    read_class_names,
)
from e2kd.pipeline._views import RENDER_SPEC
from e2kd.stages._cache_teacher.ray_session import check_ray_address, ensure_ray
from e2kd.stages._cache_teacher.teacher import TeacherSpec
from e2kd.stages._cache_teacher.worker import TeacherWorker, WorkerSpec
from e2kd.stages._options import CacheTeacherOptions
from e2kd.storage import CacheWriter, Manifest, ManifestError, create_store
from e2kd.storage._fields import Field, explanation_prefix
from e2kd.storage._options import apply_storage_options, resolve_storage_options
from e2kd.storage._ownership import check_writable

__all__ = ["CacheTeacherOptions", "run_cache_teacher"]


def _class_names(opts: CacheTeacherOptions, shards: list[InputShard]) -> tuple[str, ...] | None:
    """``--class-names FILE``, else an image folder's class directories; checked against the class count."""
    names = read_class_names(opts.class_names) if opts.class_names else class_names(shards)
    if names is not None and len(names) != opts.num_classes:
        where = opts.class_names or "the image folder's class directories"
        raise ValueError(f"--class-names: {where} gives {len(names)} names for {opts.num_classes} classes")
    return tuple(names) if names is not None else None


def _header(opts: CacheTeacherOptions, transform: InputTransform, checkpoint_sha: str | None,
            explainers: list[dict[str, Any]], names: tuple[str, ...] | None) -> Manifest:
    """The manifest of a new cache (schema 2): its fields are the logits and one explanation per explainer."""
    size = [opts.input_size, opts.input_size]
    teacher = {"name": opts.teacher, "num_classes": opts.num_classes, "kwargs": opts.teacher_kwargs,
               "checkpoint_sha256": checkpoint_sha}
    if opts.random_teacher:
        teacher["random_init_seed"] = opts.seed
    encoding, map_codec = opts.encoding, opts.explanation_codec
    fields = (Field("logits", "logits", encoding.logits_codec, {"name": "teacher"}),
              *(Field(config["name"], "explanation", map_codec, config, explanation_prefix(i, config["name"]))
                for i, config in enumerate(explainers)))
    return Manifest(e2kd_version=__version__, format=opts.format, teacher=teacher, explainer=explainers[0],
                    preprocessing={"input_size": size, "transform": transform.to_dict(), "render": RENDER_SPEC},
                    views=opts.view_policy.to_dict(), encoding=encoding.with_fields(fields), precision=opts.precision,
                    class_names=names)


def _teacher_spec(opts: CacheTeacherOptions) -> TeacherSpec:
    suffix = Path(opts.teacher_checkpoint).suffix if opts.teacher_checkpoint else ".safetensors"
    return TeacherSpec(opts.teacher, opts.num_classes, dict(opts.teacher_kwargs), suffix or ".safetensors")


def _build_teacher(opts: CacheTeacherOptions) -> tuple[InputTransform, bytes, dict[str, Any]]:
    """:func:`_build_teacher_and_explainers` with the first (default) explainer's config only."""
    transform, weights, configs = _build_teacher_and_explainers(opts)
    return transform, weights, configs[0]


def _build_teacher_and_explainers(opts: CacheTeacherOptions) -> tuple[InputTransform, bytes, list[dict[str, Any]]]:
    """Build the teacher once in the driver (a bad name, kwargs or checkpoint fails here, before Ray starts),
    with the :class:`TeacherSpec` and weight bytes every actor builds it from.

    Returns its input transform, the weights every actor loads — the checkpoint file's bytes, or for
    ``--random-teacher`` the state of a teacher initialised from ``--seed`` (identical in every actor and on
    resume, recorded by its sha256 like a checkpoint) — and each explainer's config for the manifest.
    """
    from e2kd.models import input_transform

    spec = _teacher_spec(opts)
    if not opts.random_teacher and opts.teacher_checkpoint is None:
        raise ValueError("a teacher needs --teacher-checkpoint or --teacher-run (--random-teacher: random init)")
    path = None if opts.random_teacher or opts.teacher_checkpoint is None else Path(opts.teacher_checkpoint)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    weights = spec.random_weights(opts.seed) if path is None else path.read_bytes()
    model = spec.build(weights, checkpoint=path)
    transform = input_transform(model)
    configs = []
    for i, name in enumerate(opts.explainer_names):
        explainer = build_explainer(name, model.eval(), **(opts.explainer_kwargs if i == 0 else {}))
        _check_maps(opts, explainer, transform)
        configs.append(explainer.config())
    return transform, weights, configs


def _check_maps(opts: CacheTeacherOptions, explainer: Any, transform: InputTransform) -> None:
    """One explanation of a blank image, before any work: ``--map-size`` larger than the explainer's map fails
    here (not in a worker), and maps of 2×2 or fewer cells — too coarse to teach where to look — warn."""
    import warnings

    import torch

    maps, _ = explainer(transform(torch.zeros(1, 3, opts.input_size, opts.input_size)))
    h, w = maps.shape[-2:]
    if h * w <= 4:
        warnings.warn(f"the {explainer.name} maps of {opts.teacher} are {h}×{w} at --input-size {opts.input_size} "
                      f"(the model's stride is {opts.input_size // max(h, 1)}): too coarse for an explanation loss. "
                      f"Use a larger --input-size, or a smaller stride (timm: --teacher-kwargs "
                      f"'{{\"output_stride\": 16}}')", UserWarning, stacklevel=2)
    if opts.map_size is not None:
        opts.encoding.pool_maps(maps)


def _check_not_empty(shards: list[InputShard], sizes: dict[str, int | None]) -> None:
    """An input of 0 bytes (an empty object, a directory URL that is neither a folder of images nor a tar) is an
    error before any work, never a cache of nothing."""
    empty = [s.url for s in shards if sizes[s.name] == 0 and not isinstance(s, FolderShard)]
    if empty or all(sizes[s.name] == 0 for s in shards):
        where = empty[0] if empty else shards[0].url
        raise ValueError(f"input {where} is empty (0 bytes of tar or images): nothing to cache"
                         + (f" ({len(empty)} such input shard(s))" if len(empty) > 1 else ""))


def _check_inputs_unchanged(manifest: Manifest, shards: list[InputShard], sizes: dict[str, int | None]) -> None:
    """A complete shard whose input changed size since it was cached is refused."""
    for shard in shards:
        rec = manifest.shards.get(shard.name)
        if rec and rec.complete and None not in (rec.source_bytes, sizes[shard.name]) and \
                rec.source_bytes != sizes[shard.name]:
            raise ManifestError(f"input shard {shard.name} changed since it was cached ({rec.source_bytes} bytes "
                                f"then, {sizes[shard.name]} now); use --overwrite to rebuild the cache")


def _start_workers(opts: CacheTeacherOptions, spec: WorkerSpec, ckpt_ref: Any, n: int) -> list:
    """Start ``n`` actors and load the teacher in each. ``ckpt_ref`` (the weights in Ray's object store) must stay
    referenced by the caller for the whole run: it travels with every task (wrapped in a list, so Ray passes the
    reference, not the bytes), and a restarted actor loads the teacher from it on its next task. It is not a
    constructor argument, so Ray has nothing to warn about (its "constructor arguments in the object store and
    max_restarts > 0" line on every run)."""
    import ray

    # Ray's handles (their methods gain .remote()) are untyped here
    actor_cls: Any = ray.remote(TeacherWorker).options(num_cpus=_cpus_per_actor(opts, n),
                                                       num_gpus=opts.gpus_per_actor, max_restarts=2,
                                                       max_task_retries=2)
    actors: list[Any] = [actor_cls.remote(spec, lazy=True) for _ in range(n)]
    try:
        ray.get([a.ready.remote([ckpt_ref]) for a in actors])
    except Exception as exc:  # noqa: BLE001 - report the cause in one line, not a Ray traceback
        for actor in actors:
            ray.kill(actor)
        cause = str(exc).strip().splitlines()
        raise RuntimeError(f"teacher workers failed to start: {cause[-1] if cause else type(exc).__name__}") from None
    return actors


def _cpus_per_actor(opts: CacheTeacherOptions, actors: int) -> float:
    """CPUs each actor asks Ray for: its torch threads plus its decode threads (so actors land where the cores
    are), capped — with a warning — to what the cluster has for ``actors`` actors, so the job still runs."""
    import warnings

    import ray

    wanted = opts.threads_per_actor + opts.decode_workers
    available = float(ray.cluster_resources().get("CPU", 1)) / actors
    if wanted <= available:
        return float(wanted)
    warnings.warn(f"{actors} actor(s) × (--threads-per-actor {opts.threads_per_actor} + --decode-workers "
                  f"{opts.decode_workers}) CPUs is more than the cluster's {ray.cluster_resources().get('CPU', 1):g}: "
                  f"each actor asks for {available:.2g} CPU(s) instead (its threads share them)", UserWarning,
                  stacklevel=2)
    return available


def _default_workers(opts: CacheTeacherOptions, todo: int) -> int:
    import ray

    if opts.actors:
        return opts.actors
    resources = ray.cluster_resources()
    if opts.gpus_per_actor > 0:
        slots = int(resources.get("GPU", 0) // opts.gpus_per_actor)
    else:
        slots = int(resources.get("CPU", 1) // (opts.threads_per_actor + opts.decode_workers))
    return max(1, min(slots, todo))


def run_cache_teacher(opts: CacheTeacherOptions) -> dict[str, Any]:
    """Cache a teacher's logits and explanations for every input shard; return a summary.

    Raises:
        ValueError / ManifestError: bad options, or a store written with different settings.
        StoreLockedError: another run is writing the store.
        RuntimeError: shards that failed (named), after every other shard was cached.
    """
    if opts.teacher_checkpoint is None and not opts.random_teacher:
        raise ValueError("no --teacher-checkpoint: give the teacher's weights (or --teacher-run), or --random-teacher "
                         "to cache a randomly initialised teacher (seeded by --seed; for benchmarks and tests)")
    apply_storage_options(resolve_storage_options(opts.storage_options, [opts.data, opts.out]))
    check_writable(opts.out, create_bucket=opts.create_bucket)  # every check before any work; nothing created
    check_ray_address(opts.ray_address)
    shards = list_shards(opts.data)
    names = _class_names(opts, shards)
    sizes = {s.name: input_size_bytes(s) for s in shards}  # every input is reachable before the store is touched
    _check_not_empty(shards, sizes)
    transform, checkpoint, explainers = _build_teacher_and_explainers(opts)
    header = _header(opts, transform, hashlib.sha256(checkpoint).hexdigest(), explainers, names)
    with create_store(opts.out, header, overwrite=opts.overwrite, create_bucket=opts.create_bucket) as writer:
        _check_inputs_unchanged(writer.manifest, shards, sizes)
        todo = [s for s in shards if s.name not in writer.complete]
        t0 = time.time()
        failed, processing = _run_shards(opts, writer, todo, checkpoint, sizes) if todo else ({}, 0.0)
        elapsed = time.time() - t0
        return _summary(writer.manifest, todo, failed, elapsed, processing, len(shards) - len(todo))


def _worker_spec(opts: CacheTeacherOptions, writer: CacheWriter) -> WorkerSpec:
    m = writer.manifest
    return WorkerSpec(teacher={"name": opts.teacher, "num_classes": opts.num_classes, "kwargs": opts.teacher_kwargs},
                      explainer=m.explainer, views=m.views, input_size=m.input_size, encoding=m.encoding,
                      extra_explainers=tuple(f.producer for f in m.encoding.explanation_fields[1:]),
                      writer=writer.shard_writer(), batch_size=opts.batch_size, precision=opts.precision,
                      threads=opts.threads_per_actor, decode_workers=opts.decode_workers,
                      checkpoint_suffix=Path(opts.teacher_checkpoint or "w.safetensors").suffix,
                      storage_options=resolve_storage_options(opts.storage_options, [opts.data, opts.out]))


class ProgressCounter:
    """A Ray actor the workers add finished samples to (fire-and-forget); the driver takes the count."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


class _SampleBar:
    """Progress per sample (not per shard: a big shard is not one tick), throughput, shards done, and an ETA once
    the first shard tells samples per input byte (when every input's size is known)."""

    def __init__(self, todo: list[InputShard], sizes: dict[str, int | None], enabled: bool) -> None:
        from e2kd._progress import progress

        self.todo_bytes = [sizes.get(s.name) for s in todo]
        self.shards, self.done_shards, self.done_bytes, self.done_samples = len(todo), 0, 0, 0
        self.bar = progress(total=None, unit="sample", desc="cache-teacher", disable=not enabled, dynamic_ncols=True)

    def samples(self, n: int) -> None:
        if n:
            if self.bar.total is not None and self.bar.n + n > self.bar.total:
                self.bar.total = self.bar.n + n  # the estimate was low
            self.bar.update(n)

    def shard_done(self, num_bytes: int | None, num_samples: int) -> None:
        self.done_shards += 1
        self.done_samples += num_samples
        if num_bytes is not None and None not in self.todo_bytes and self.done_bytes + num_bytes > 0:
            self.done_bytes += num_bytes
            todo = sum(b or 0 for b in self.todo_bytes)
            self.bar.total = max(self.bar.n, round(self.done_samples / self.done_bytes * todo))
        self.bar.set_postfix(shards=f"{self.done_shards}/{self.shards}")

    def close(self) -> None:
        self.bar.close()


def _run_shards(opts: CacheTeacherOptions, writer: CacheWriter, todo: list[InputShard], checkpoint: bytes,
                sizes: dict[str, int | None]) -> tuple[dict[str, str], float]:
    """Process shards on Ray actors; return (failed shard → reason, seconds from the first submission).

    A hand-written queue rather than ``ray.util.ActorPool``: a failed task must be attributed to its shard
    (recorded as failed, the others go on), and ActorPool's unordered results lose that on an error.
    """
    import ray

    ensure_ray(opts.ray_address)
    ckpt_ref = ray.put(checkpoint)  # the teacher's weights: kept alive until every shard is done
    actors = _start_workers(opts, _worker_spec(opts, writer), ckpt_ref, _default_workers(opts, len(todo)))
    counter: Any = ray.remote(ProgressCounter).options(num_cpus=0).remote() if opts.progress else None
    queue, running, failed = list(todo), {}, {}
    bar, t0 = _SampleBar(todo, sizes, opts.progress), time.time()

    def submit(actor: Any) -> None:
        if queue:
            shard = queue.pop(0)
            running[actor.cache_shard.remote(shard, [ckpt_ref], counter)] = (actor, shard)

    try:
        for actor in actors:
            submit(actor)
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            if counter is not None:
                bar.samples(ray.get(counter.take.remote()))
            if not done:
                continue
            actor, shard = running.pop(done[0])
            try:
                result = ray.get(done[0])
                writer.record(result["name"], result["record"], result["keys"], source_bytes=sizes[shard.name])
                bar.shard_done(sizes[shard.name], result["record"].num_samples)
            except Exception as exc:  # noqa: BLE001 - one failed shard must not stop the others
                failed[shard.name] = _reason(exc)
                bar.shard_done(None, 0)
            submit(actor)
    finally:
        bar.close()
        for actor in [*actors, *([counter] if counter is not None else [])]:
            ray.kill(actor)
    return failed, time.time() - t0  # ckpt_ref (the teacher's weights) stayed referenced until here


def _reason(exc: BaseException) -> str:
    """One line: the original error inside a Ray task error, else the error itself."""
    cause = getattr(exc, "cause", None) or exc
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def _summary(manifest: Manifest, todo: list[InputShard], failed: dict[str, str], elapsed: float,
             processing: float, skipped_complete: int) -> dict[str, Any]:
    recs = manifest.shards
    n = sum(r.num_samples for r in recs.values())
    new = sum(recs[s.name].num_samples for s in todo if s.name in recs)
    nbytes = sum(r.nbytes for r in recs.values())
    views = manifest.num_views
    summary = {"num_samples": n, "skipped": sum(r.num_errors for r in recs.values()), "shards": len(recs),
               "shards_cached_now": len(todo) - len(failed), "shards_already_complete": skipped_complete,
               "bytes": nbytes, "bytes_per_sample_view": nbytes / max(1, n * views),
               "samples_per_s": new / processing if processing > 0 else 0.0, "seconds": elapsed,
               "startup_seconds": elapsed - processing, "failed": failed}
    if not failed and n == 0:
        raise RuntimeError(f"no sample could be cached from {len(recs)} input shard(s): every one was skipped "
                           f"(`e2kd inspect --errors` on the store lists why); the store holds none")
    if failed:
        names = ", ".join(f"{k} ({v})" for k, v in sorted(failed.items()))
        raise RuntimeError(f"{len(failed)} shard(s) failed and were not cached: {names}. Re-run the same command "
                           f"to retry them; complete shards are kept")
    return summary

"""The Ray actor of cache-teacher: holds one teacher, turns one input shard into one committed store shard."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e2kd.explain import build_explainer
from e2kd.models import create_model, input_transform
from e2kd.pipeline.sources import BadSample, InputShard, Sample, input_sha256, iter_shard
from e2kd.pipeline.views import ViewPolicy, render_view
from e2kd.storage.encoding import Encoding
from e2kd.storage.files import STAGING_DIR, check_lock_token, commit_dir, is_local, resolve
from e2kd.storage.manifest import shard_record
from e2kd.storage.shards import stage_shard

__all__ = ["WorkerSpec", "TeacherWorker", "PRECISIONS"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class WorkerSpec:
    """Everything a worker needs, as plain values (it travels to Ray workers)."""

    teacher: dict[str, Any]  # model_spec: name, num_classes, kwargs
    explainer: str
    views: dict[str, Any]
    input_size: tuple[int, int]
    encoding: dict[str, Any]
    fmt: str
    store_uri: str
    batch_size: int = 64
    precision: str = "fp32"
    threads: int = 1
    checkpoint_suffix: str = ".safetensors"
    lock_token: str | None = None  # the driver's lock: checked before every commit
    extra: dict[str, Any] = field(default_factory=dict)


class TeacherWorker:
    """Loads the teacher once; :meth:`cache_shard` writes and commits one shard and returns its record."""

    def __init__(self, spec: WorkerSpec, checkpoint: bytes | None = None) -> None:
        torch.set_num_threads(spec.threads)  # fixed threads: byte-identical output whatever the worker count
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self._load_teacher(spec, checkpoint).to(self.device).eval().requires_grad_(False)
        self.transform = input_transform(self.model)
        self.explainer = build_explainer(spec.explainer, self.model)
        self.policy = ViewPolicy.from_dict(spec.views)
        self.encoding = Encoding.from_dict(spec.encoding)
        self.fs, self.root = resolve(spec.store_uri)
        if is_local(self.fs) and not os.path.isdir(self.root):
            raise RuntimeError(f"store {self.root} is not visible on this node: on a multi-node cluster --out must "
                               f"be shared storage or an object-store URL")

    @staticmethod
    def _load_teacher(spec: WorkerSpec, checkpoint: bytes | None) -> torch.nn.Module:
        if checkpoint is None:
            return create_model(spec.teacher["name"], spec.teacher["num_classes"], **spec.teacher["kwargs"])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"teacher{spec.checkpoint_suffix}"
            path.write_bytes(checkpoint)
            return create_model(spec.teacher["name"], spec.teacher["num_classes"], checkpoint=path,
                                **spec.teacher["kwargs"])

    def ready(self) -> str:
        return str(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.spec.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _explain(self, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        x = self.transform(torch.stack(images).to(self.device))
        with self._autocast():
            maps = self.explainer(x)
        maps = self.encoding.pool_maps(maps.float())
        return self.explainer.last_logits.float().cpu().numpy(), maps.cpu().numpy()

    def _views_and_inputs(self, sample: Sample) -> tuple[list[list[float]], list[torch.Tensor]]:
        _, h, w = sample.image.shape
        views = [v.as_list() for v in self.policy.views_for(sample.key, h, w)]
        return views, [render_view(sample.image, v, self.spec.input_size) for v in views]

    def compute(self, shard: InputShard) -> tuple[dict[str, np.ndarray], list[str], list[dict[str, str]]]:
        """Run the teacher over one input shard: (columns, keys, errors)."""
        keys, labels, views, errors = [], [], [], []
        logits, maps, pending = [], [], []
        for item in iter_shard(shard):
            if isinstance(item, BadSample):
                errors.append(item.to_dict())
                continue
            sample_views, inputs = self._views_and_inputs(item)
            keys.append(item.key)
            labels.append(self._checked_label(item, errors))
            views.append(sample_views)
            pending.extend(inputs)
            while len(pending) >= self.spec.batch_size:  # batches formed within the shard only
                out_l, out_m = self._explain(pending[: self.spec.batch_size])
                logits.append(out_l)
                maps.append(out_m)
                pending = pending[self.spec.batch_size:]
        if pending:
            out_l, out_m = self._explain(pending)
            logits.append(out_l)
            maps.append(out_m)
        return self._columns(keys, labels, views, logits, maps), keys, errors

    def _checked_label(self, item: Sample, errors: list[dict[str, str]]) -> int:
        """A label outside ``[0, C)`` (other than −1, unlabelled) is kept as −1 and recorded."""
        num_classes = self.spec.teacher["num_classes"]
        if -1 <= item.label < num_classes:
            return item.label
        errors.append({"key": item.key, "shard": item.shard, "kept": "unlabelled",
                       "reason": f"label {item.label} outside [0, {num_classes}): cached as unlabelled (-1)"})
        return -1

    def _columns(self, keys: list[str], labels: list[int], views: list, logits: list, maps: list
                 ) -> dict[str, np.ndarray]:
        n, v = len(keys), self.policy.num_views
        if n == 0:
            all_logits = np.zeros((0, v, self.spec.teacher["num_classes"]), np.float32)
            all_maps = np.zeros((0, v, 1, 1, 1), np.float32)
        else:
            all_logits = np.concatenate(logits).reshape(n, v, -1)
            stacked = np.concatenate(maps)
            all_maps = stacked.reshape(n, v, *stacked.shape[1:])
        cols = self.encoding.encode(all_logits, all_maps)
        cols["labels"] = np.asarray(labels, dtype=np.int32).reshape(n)
        cols["views"] = np.asarray(views, dtype=np.float32).reshape(n, v, 5)
        return cols

    def cache_shard(self, shard: InputShard) -> dict[str, Any]:
        """Compute, stage and commit one shard; return ``{"name", "record"}`` for the manifest."""
        cols, keys, errors = self.compute(shard)
        if is_local(self.fs):
            staging_root = Path(self.root) / STAGING_DIR
        else:
            staging_root = Path(tempfile.mkdtemp(prefix="e2kd-stage-"))
        staged, sha, nbytes = stage_shard(staging_root, self.spec.fmt, cols, keys, errors, self.encoding)
        try:
            if self.spec.lock_token is not None:  # a worker that outlived its killed driver must not commit
                check_lock_token(self.fs, self.root, self.spec.lock_token)
            commit_dir(staged, self.fs, self.root, shard.name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        map_shape = list(cols["maps"].shape[2:]) if keys else None
        relabelled = sum(1 for e in errors if "kept" in e)
        record = shard_record(source=shard.url, num_samples=len(keys), num_errors=len(errors) - relabelled,
                              sha256=sha, nbytes=nbytes, map_shape=map_shape, num_bad_labels=relabelled)
        record["source_sha256"] = input_sha256(shard)
        return {"name": shard.name, "record": record, "keys": keys}

"""The Ray actor of cache-teacher: holds one teacher, turns one input shard into one committed store shard."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from e2kd._plugins import load_plugins
from e2kd.explain import build_explainer
from e2kd.explain._registry import explain_together
from e2kd.models import input_transform
from e2kd.pipeline._parallel import ordered_map
from e2kd.pipeline._sources import BadSample, InputShard, Sample, input_sha256
from e2kd.pipeline._views import ViewPolicy, render_view_uint8
from e2kd.stages._cache_teacher.teacher import TeacherSpec
from e2kd.storage import PRECISIONS, Encoding, ShardWriter
from e2kd.storage._options import StorageOptions, apply_storage_options

__all__ = ["WorkerSpec", "TeacherWorker", "AUTOCAST_DTYPES"]

#: ``--precision`` → the teacher's autocast dtype (None: plain fp32).
AUTOCAST_DTYPES = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))


@dataclass
class WorkerSpec:
    """Everything a worker needs, as plain values (it travels to Ray workers)."""

    teacher: dict[str, Any]  # model_spec: name, num_classes, kwargs
    explainer: dict[str, Any]  # name + constructor kwargs (the manifest's explainer entry, less its family)
    views: dict[str, Any]
    input_size: tuple[int, int]
    encoding: Encoding
    writer: ShardWriter
    batch_size: int = 64
    precision: str = "fp32"
    threads: int = 1
    checkpoint_suffix: str = ".safetensors"
    decode_workers: int = 0  # threads decoding and rendering ahead of the teacher (0: inline)
    extra_explainers: tuple[dict[str, Any], ...] = ()  # further explanation fields' explainers (``--explainers``)
    storage_options: StorageOptions | None = None  # protocol → fsspec arguments (secrets: never logged)

    def __repr__(self) -> str:  # Ray may print a failed actor's arguments: never the storage options
        return f"WorkerSpec(teacher={self.teacher['name']!r}, store={self.writer.uri!r})"


class TeacherWorker:
    """Holds one teacher; :meth:`cache_shard` writes and commits one shard and returns its record.

    In-process the weights come with the constructor (none: a random-init teacher). As a Ray actor
    (``lazy=True``) they come with each call, as ``[ObjectRef]``, and are loaded once — again after Ray restarted
    a crashed actor.
    """

    def __init__(self, spec: WorkerSpec, checkpoint: bytes | None = None, lazy: bool = False) -> None:
        load_plugins()  # explainers and codecs of E2KD_PLUGINS, as in the driver
        torch.set_num_threads(spec.threads)  # fixed threads: byte-identical output whatever the worker count
        apply_storage_options(spec.storage_options)  # before any input or store URL is opened here
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.policy = ViewPolicy.from_dict(spec.views)
        self.encoding = spec.encoding
        self.model: torch.nn.Module | None = None
        self._batch: torch.Tensor | None = None  # CPU teacher: the batch buffer (see _stacked)
        spec.writer.check_reachable()
        if not lazy:
            self._load(checkpoint)

    def _load(self, checkpoint: bytes | list | None) -> None:
        """Build the teacher and its explainer (once): ``checkpoint`` is the weights' bytes or ``[ObjectRef]``."""
        if self.model is not None:
            return
        if isinstance(checkpoint, list):
            import ray

            weights: bytes | None = ray.get(checkpoint[0])
        else:
            weights = checkpoint
        self.model = self._load_teacher(self.spec, weights).to(self.device).eval().requires_grad_(False)
        self.transform = input_transform(self.model)
        self.explainers = {}  # explanation field → explainer (the field is named after its explainer)
        for config in (self.spec.explainer, *self.spec.extra_explainers):
            kwargs = {k: v for k, v in config.items() if k not in ("name", "family")}
            self.explainers[config["name"]] = build_explainer(config["name"], self.model, **kwargs)
        self.explainer = next(iter(self.explainers.values()))

    @staticmethod
    def _load_teacher(spec: WorkerSpec, checkpoint: bytes | None) -> torch.nn.Module:
        """The driver's :class:`TeacherSpec` build, from the weights' bytes (no temporary file)."""
        return TeacherSpec.from_dict(spec.teacher, spec.checkpoint_suffix).build(checkpoint)

    def ready(self, checkpoint: bytes | list | None = None) -> str:
        """Load the teacher now (start-up errors surface here, before any shard); the device it runs on."""
        self._load(checkpoint)
        return str(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.spec.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _input(self, view: torch.Tensor) -> torch.Tensor:
        """A rendered uint8 view as :meth:`_explain` takes it. For a GPU teacher it stays uint8 (4× fewer bytes to
        copy; normalised on the device); for a CPU teacher it is normalised here, in the decode threads, in parallel
        (elementwise: the same values as normalising the batch)."""
        return view if self.device.type == "cuda" else self.transform(view[None])[0]

    def _explain(self, inputs: list[torch.Tensor]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Teacher outputs of a batch of :meth:`_input` views: logits, and maps per explanation field (the logits
        are the first explainer's; each further explainer explains the same inputs)."""
        if self.device.type == "cuda":  # pinned: the copy runs asynchronously, overlapped with the decode threads
            x = self.transform(torch.stack(inputs).pin_memory().to(self.device, non_blocking=True))
        else:
            x = self._stacked(inputs)
        with self._autocast():  # one teacher forward for every explainer that can share it
            all_maps, logits = explain_together(list(self.explainers.values()), x)
        maps = {name: self.encoding.pool_maps(m.float()).cpu().numpy()
                for name, m in zip(self.explainers, all_maps, strict=True)}
        return logits.float().cpu().numpy(), maps

    def _stacked(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """``inputs`` stacked into a buffer kept across batches (a fresh 38 MB batch each time costs more in page
        faults than the copy itself); the teacher is done with a batch before the next is stacked."""
        n, shape = len(inputs), tuple(inputs[0].shape)
        if self._batch is None or self._batch.shape[0] < n or tuple(self._batch.shape[1:]) != shape:
            self._batch = torch.empty((max(n, self.spec.batch_size), *shape), dtype=inputs[0].dtype)
        return torch.stack(inputs, out=self._batch[:n])

    def _views_and_inputs(self, sample: Sample) -> tuple[list[list[float]], list[torch.Tensor]]:
        _, h, w = sample.image.shape
        views = [v.as_list() for v in self.policy.views_for(sample.key, h, w)]
        return views, [self._input(render_view_uint8(sample.pixels, v, self.spec.input_size)) for v in views]

    def _prepared(self, shard: InputShard) -> Iterator[tuple[Sample | BadSample, list, list[torch.Tensor]]]:
        """Decoded samples with their views rendered, in shard order — by ``spec.decode_workers`` threads ahead
        of the teacher (0: inline)."""
        def prepare(raw: Any) -> tuple[Sample | BadSample, list, list[torch.Tensor]]:
            item = raw if isinstance(raw, BadSample) else shard.decode(raw)
            if isinstance(item, BadSample):
                return item, [], []
            return (item, *self._views_and_inputs(item))

        ahead = max(2 * self.spec.decode_workers, -(-2 * self.spec.batch_size // self.policy.num_views))
        return ordered_map(prepare, shard.raw(), self.spec.decode_workers, ahead)

    def compute(self, shard: InputShard, progress: Any = None
                ) -> tuple[dict[str, np.ndarray], list[str], list[dict[str, str]]]:
        """Run the teacher over one input shard: (columns, keys, errors). ``progress`` (a Ray actor handle with
        ``add``) is told how many samples each teacher batch finished."""
        reported = 0
        keys, labels, views, errors = [], [], [], []
        logits, maps, pending = [], [], []
        for item, sample_views, inputs in self._prepared(shard):
            if isinstance(item, BadSample):
                errors.append(item.to_dict())
                continue
            keys.append(item.key)
            labels.append(self._checked_label(item, errors))
            views.append(sample_views)
            pending.extend(inputs)
            while len(pending) >= self.spec.batch_size:  # batches formed within the shard only
                out_l, out_m = self._explain(pending[: self.spec.batch_size])
                logits.append(out_l)
                maps.append(out_m)
                pending = pending[self.spec.batch_size:]
                if progress is not None:
                    done = len(keys) - -(-len(pending) // self.policy.num_views)  # samples whose views are all done
                    progress.add.remote(done - reported)
                    reported = done
        if pending:
            out_l, out_m = self._explain(pending)
            logits.append(out_l)
            maps.append(out_m)
        if progress is not None and len(keys) > reported:
            progress.add.remote(len(keys) - reported)
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
        all_maps = {}
        if n == 0:
            all_logits = np.zeros((0, v, self.spec.teacher["num_classes"]), np.float32)
            all_maps = {name: np.zeros((0, v, 1, 1, 1), np.float32) for name in self.explainers}
        else:
            all_logits = np.concatenate(logits).reshape(n, v, -1)
            for name in self.explainers:
                stacked = np.concatenate([batch[name] for batch in maps])
                all_maps[name] = stacked.reshape(n, v, *stacked.shape[1:])
        cols = self.encoding.encode(all_logits, self._by_field(all_maps))
        cols["labels"] = np.asarray(labels, dtype=np.int32).reshape(n)
        cols["views"] = np.asarray(views, dtype=np.float32).reshape(n, v, 5)
        return cols

    def _by_field(self, maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Maps by explanation field name (the encoding's fields, in explainer order; a bare encoding has one)."""
        fields = self.encoding.explanation_fields
        return {f.name: m for f, m in zip(fields, maps.values(), strict=True)}

    def cache_shard(self, shard: InputShard, checkpoint: bytes | list | None = None,
                    progress: Any = None) -> dict[str, Any]:
        """Compute, write and commit one shard; return ``{"name", "record", "keys"}`` for the driver to record."""
        self._load(checkpoint)
        cols, keys, errors = self.compute(shard, progress)
        record = self.spec.writer.write_shard(shard.name, cols, keys, errors, source=shard.url,
                                              source_sha256=input_sha256(shard))
        return {"name": shard.name, "record": record, "keys": keys}

"""Shared fixtures: one small digits-shift dataset, one tiny teacher, one Ray session and one cache; the fault
suite's reference store and its tally (printed as one line at the end of the run)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TEACHER_KWARGS = {"channels": [8, 16, 32, 64], "stem_width": 8, "output_stride": 16}


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from e2kd.pipeline._datasets import make_digits_shift

    out = tmp_path_factory.mktemp("digits")
    make_digits_shift(out, seed=0, image_size=64, shard_size=50)
    return out


@pytest.fixture(scope="session")
def train_urls(digits: Path) -> str:
    return f"{digits}/train-{{000000..000005}}.tar"


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from e2kd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", 10, **TEACHER_KWARGS)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(model.state_dict(), path)
    return path


def cache_options(data: str, out: Path | str, ckpt: Path, **overrides):
    from e2kd.stages._cache_teacher import CacheTeacherOptions

    opts = dict(data=data, out=str(out), teacher="resnet18", num_classes=10, teacher_checkpoint=str(ckpt),
                teacher_kwargs=dict(TEACHER_KWARGS), views="2", flip_p=0.5, crop_scale=(0.3, 1.0), input_size=64,
                batch_size=16, actors=2, progress=False)
    opts.update({CacheTeacherOptions.ALIASES.get(k, k): v for k, v in overrides.items()})  # workers= → actors=
    return CacheTeacherOptions(**opts)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory, train_urls: str, teacher_ckpt: Path) -> Path:
    """The reference cache: 6 train shards, 2 random views, 2 workers."""
    from e2kd.stages._cache_teacher import run_cache_teacher

    out = tmp_path_factory.mktemp("caches") / "ref"
    run_cache_teacher(cache_options(train_urls, out, teacher_ckpt))
    return out


def committed_shards(fs, root: str) -> dict[str, dict]:  # noqa: ANN001 - any fsspec filesystem
    """The shards a reader sees now (the manifest and the commit records), as JSON records; {} before any."""
    from e2kd.storage._commits import read_view

    try:
        view, _ = read_view(fs, str(root))
    except (FileNotFoundError, ValueError):
        return {}
    return view.document["shards"]


def shard_checksums(store: Path | str) -> dict[str, str]:
    from e2kd.storage import open_store

    return {n: r.sha256 for n, r in open_store(str(store)).manifest.shards.items()}


# ---- the fault suite (tests/faults) ---------------------------------------------------------------
KINDS = ("clear error", "skipped+recorded", "fault survived")


class FaultLog:
    """What the fault cases found: each case records its outcome and the samples it lost (must be 0)."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.lost = 0

    def record(self, kind: str, lost: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown outcome {kind!r}")
        self.outcomes[kind] += 1
        self.lost += lost

    def line(self) -> str:
        tried = sum(self.outcomes.values())
        return (f"fault suite: {tried} cases tried, {self.outcomes['clear error']} clear errors, "
                f"{self.outcomes['skipped+recorded']} skipped+recorded, {self.outcomes['fault survived']} faults "
                f"survived, {self.lost} samples lost")


_LOG = FaultLog()


@pytest.fixture(scope="session")
def fault_log() -> FaultLog:
    return _LOG


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's hook signature
    if sum(_LOG.outcomes.values()):
        terminalreporter.write_line(_LOG.line())


@pytest.fixture(scope="session")
def teacher_train_urls(digits: Path) -> str:
    return f"{digits}/teacher-train-{{000000..000021}}.tar"


@pytest.fixture(scope="session")
def reference_22(tmp_path_factory: pytest.TempPathFactory, teacher_train_urls: str, teacher_ckpt: Path) -> Path:
    """An uninterrupted cache of the 22 teacher-train shards (2 views, 2 workers): what every faulty run must equal."""
    from e2kd.stages._cache_teacher import run_cache_teacher

    out = tmp_path_factory.mktemp("reference") / "store"
    run_cache_teacher(cache_options(teacher_train_urls, out, teacher_ckpt, workers=2))
    return out


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory, digits: Path, teacher_ckpt: Path) -> dict[str, Path]:
    """Two-shard caches of train-000000..000001 in each format, to copy and tamper with (never modified)."""
    from e2kd.stages._cache_teacher import run_cache_teacher

    data = f"{digits}/train-{{000000..000001}}.tar"
    out = {}
    for fmt in ("zarr", "wds"):
        store = tmp_path_factory.mktemp("pristine") / fmt
        run_cache_teacher(cache_options(data, store, teacher_ckpt, workers=1, format=fmt))
        out[fmt] = store
    return out


# ---- object storage: a real S3-compatible HTTP server on loopback (moto's standalone server) through s3fs ----------
#: Recognisable fake credentials: a test greps every output for them (moto accepts any).
S3_KEY, S3_SECRET = "AKIAE2KDFAKEKEY0451", "e2kd-fake-secret-7f3c9a"


class S3:
    """One bucket on the loopback S3 server: ``url(path)``, the ``--storage-options`` JSON, an s3fs filesystem."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        import s3fs

        self.endpoint, self.bucket = endpoint, bucket
        self.options = {"endpoint_url": endpoint, "key": S3_KEY, "secret": S3_SECRET,
                        "client_kwargs": {"region_name": "us-west-2"}}
        self.fs = s3fs.S3FileSystem(**self.options)
        self.fs.mkdir(bucket)

    @property
    def options_json(self) -> str:
        import json

        return json.dumps(self.options)

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def use(self) -> None:
        """This process's s3:// URLs go to the loopback server (what --storage-options does in a command)."""
        from e2kd.storage._options import apply_storage_options

        apply_storage_options({"s3": self.options})


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, request: pytest.FixtureRequest) -> S3:
    """A fresh bucket per test (named after it)."""
    import hashlib

    return S3(s3_endpoint, "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20])

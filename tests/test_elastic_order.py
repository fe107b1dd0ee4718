"""Students on preemptible GPUs: one order of global batches for any number of ranks and workers, mid-epoch
checkpoints, kill -9 / SIGTERM and resume (bit-identical), a 2-rank run resumed on 1 rank, metrics over ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from e2kd.pipeline._loader import JoinPlan, StreamSpec
from e2kd.pipeline._order import Order, default_partitions

STUDENT_KWARGS = {"channels": [8, 8, 16, 32], "stem_width": 8, "output_stride": 16}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
E2KD = [sys.executable, "-m", "e2kd.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


# ---- the order alone -------------------------------------------------------------------------------------------
def _order(seed: int = 3) -> Order:
    sizes = [37, 50, 64, 12, 80, 50, 41, 66, 9, 50]
    keys = {f"s{i:02d}": [f"s{i:02d}/{j}" for j in range(n)] for i, n in enumerate(sizes)}
    return Order(keys, seed=seed, global_batch=16, partitions=8, block=16)


def _keys(items: list) -> list[str]:
    return [i.key for i in items]


def test_every_rank_and_worker_count_slices_the_same_global_batches() -> None:
    order = _order()
    steps = order.steps_per_pass
    seen = [k for s in range(steps) for k in _keys(order.global_batch_items(0, s))]
    assert len(seen) == len(set(seen)) == steps * 16 and order.num_samples - len(seen) < 16  # one pass, each once
    for world, workers in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (8, 1), (2, 4)]:
        for step in range(steps):
            parts = [_keys(order.partition_items(0, step, p)) for r in range(world) for w in range(workers)
                     for p in order.reader_partitions(r, world, w, workers)]
            assert [k for part in parts for k in part] == _keys(order.global_batch_items(0, step)), (world, workers)
    assert _keys(order.global_batch_items(1, 0)) != _keys(order.global_batch_items(0, 0))  # a new order per epoch
    assert _keys(_order(seed=3).global_batch_items(5, 2)) == _keys(order.global_batch_items(5, 2))  # a function of
    # (seed, epoch, step) alone
    with pytest.raises(ValueError, match="multiple of ranks × DataLoader workers"):
        order.reader_partitions(0, 16, 0, 1)
    assert default_partitions(16, 1) == 8 and default_partitions(16, 16) == 16 and default_partitions(4, 2) == 4


def test_each_reader_reads_each_shard_once_per_pass_front_to_back() -> None:
    order = _order()
    for p in range(order.partitions):
        visits = []
        for step in range(order.steps_per_pass):
            for item in order.partition_items(0, step, p):
                if not visits or visits[-1][0] != item.shard:
                    visits.append((item.shard, item.block))
                assert item.block >= visits[-1][1]  # blocks of a shard only move forward
                visits[-1] = (item.shard, item.block)
        assert len({v[0] for v in visits}) == len(visits), visits  # no shard entered twice


def test_a_shared_scan_reads_each_record_once_and_keeps_only_blocks_a_reader_will_read() -> None:
    from e2kd.pipeline._train_stream import ShardScan

    keys = [f"k{i}" for i in range(12)]  # blocks of 4: 0 = k0…k3, 1 = k4…k7, 2 = k8…k11
    pulled: list[str] = []

    def raw():  # noqa: ANN202
        for key in keys:
            pulled.append(key)
            yield {"__key__": key}

    scan = ShardScan(raw(), {k: i // 4 for i, k in enumerate(keys)}, {0: 4, 1: 4, 2: 4}, lambda r: r["__key__"],
                     lambda key: None)
    scan.enter(1, range(0, 2))  # reader 1 reads blocks 0 and 1, reader 2 blocks 1 and 2
    scan.enter(2, range(1, 3))
    assert set(scan.block(2, 1)) == set(keys[4:8])  # reader 2 first: block 0 read on the way and kept for reader 1
    assert pulled == keys[:8] and sorted(scan._kept) == [0, 1]
    assert set(scan.block(1, 0)) == set(keys[:4]) and pulled == keys[:8]  # from memory
    assert set(scan.block(1, 1)) == set(keys[4:8])
    assert sorted(scan._kept) == [1]  # block 0: nobody will read it again
    assert set(scan.block(2, 2)) == set(keys[8:]) and pulled == keys  # each record read once
    scan.leave(1)
    scan.leave(2)
    assert sorted(scan._kept) == [2]  # only the block at the front (the scan goes when its shard's readers leave)
    late = ShardScan(iter([{"__key__": k} for k in keys]), {k: i // 4 for i, k in enumerate(keys)},
                     {0: 4, 1: 4, 2: 4}, lambda r: r["__key__"], lambda key: None)
    late.enter(1, range(2, 3))
    assert set(late.block(1, 2)) == set(keys[8:])
    late.enter(3, range(0, 1))  # a reader that came after the scan passed its block unkept: None, it scans anew
    assert late.block(3, 0) is None


# ---- training runs ---------------------------------------------------------------------------------------------
def _args(data: str, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--data", data, "--cache", str(cache), "--student", "resnet18", "--student-kwargs",
            json.dumps(STUDENT_KWARGS), "--out", str(out), "--lr", "3e-3", "--temperature", "2", "--quiet",
            "--epochs", "2", "--checkpoint-every", "3", "--trace-keys", str(out.parent / f"{out.name}.trace"),
            *extra]


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _trace(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out.parent / f"{out.name}.trace").read_text().splitlines()]


def _weights(out: Path) -> bytes:
    return (out / "student.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(cache: Path, train_urls: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank × 16, no workers, uninterrupted."""
    out = tmp_path_factory.mktemp("elastic") / "reference"
    _run([*E2KD, *_args(train_urls, cache, out, "--batch-size", "16")])
    return out


def test_one_pass_per_epoch_and_the_same_batches_with_workers_and_with_two_ranks(
        reference: Path, cache: Path, train_urls: str, tmp_path: Path) -> None:
    trace = _trace(reference)
    per_epoch = 300 // 16
    assert [(t["epoch"], t["step"]) for t in trace] == [(e, s) for e in range(2) for s in range(per_epoch)]
    first = [k for t in trace if t["epoch"] == 0 for k in t["keys"]]
    assert len(first) == len(set(first)) == per_epoch * 16  # every sample at most once; 300 mod 16 = 12 left over
    workers = tmp_path / "workers"
    _run([*E2KD, *_args(train_urls, cache, workers, "--batch-size", "16", "--workers", "2")])
    assert _trace(workers) == trace
    assert _weights(workers) == _weights(reference)  # the same batches in the same order: the same weights
    ranks = tmp_path / "ranks"
    result = _run([*TORCHRUN, "--master_port", "29541", "-m", "e2kd.cli",
                   *_args(train_urls, cache, ranks, "--batch-size", "8")])
    assert _trace(ranks) == trace
    assert result.stdout.count("trained ") == 1  # one summary line for the run, not one per rank


def test_two_ranks_decoding_on_the_device_train_on_the_same_batches(reference: Path, cache: Path, train_urls: str,
                                                                     tmp_path: Path) -> None:
    """``--decode-on-device`` under torchrun (gloo, CPU: the digits are PNGs, so the CPU decoder runs beside the
    trainer): each rank's batches are its slice of the same global batches, and the run ends normally."""
    out = tmp_path / "device"
    result = _run([*TORCHRUN, "--master_port", "29543", "-m", "e2kd.cli",
                   *_args(train_urls, cache, out, "--batch-size", "8", "--workers", "1", "--decode-on-device")])
    assert _trace(out) == _trace(reference)
    assert result.stdout.count("trained ") == 1 and (out / "student.safetensors").exists()


def _report_from_rank(rank: int, init: str, results: object) -> None:
    from e2kd.training._loop import Trainer

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    trainer = Trainer.__new__(Trainer)
    trainer.world = 2
    results[rank] = trainer._mean_over_ranks({"loss": 1.0 + rank, "kd": 10.0 * rank})  # type: ignore[index]
    torch.distributed.destroy_process_group()


def test_reported_losses_are_the_mean_over_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_report_from_rank, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
        assert dict(results) == {0: {"loss": 1.5, "kd": 5.0}, 1: {"loss": 1.5, "kd": 5.0}}  # not rank 0's own


def _kill_mid_epoch(cmd: list[str], out: Path, how: int = signal.SIGKILL) -> subprocess.Popen:
    """Start ``cmd``; once a checkpoint within an epoch is written and a step later, send ``how``."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be stopped"
            try:
                state = torch.load(out / "checkpoint.pt", weights_only=True)
            except (FileNotFoundError, RuntimeError, EOFError):
                state = {}
            if state.get("step", 0) > 0 or state.get("epoch", 0) >= 1:
                break
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        if how == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, how)
    proc.wait(timeout=300)
    return proc


@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_minus_nine_mid_epoch_and_resume_ends_bit_identical(reference: Path, cache: Path, train_urls: str,
                                                                 tmp_path: Path, workers: str) -> None:
    out = tmp_path / "killed"
    args = _args(train_urls, cache, out, "--batch-size", "16", "--workers", workers)
    _kill_mid_epoch([*E2KD, *args], out)
    assert not (out / "student.safetensors").exists(), "the kill must land before the run ends"
    _run([*E2KD, *args, "--resume"])
    assert _weights(out) == _weights(reference)
    assert _trace(out) == _trace(reference)  # the resumed run traced from where it resumed, nothing twice
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]


def test_sigterm_checkpoints_after_the_step_and_says_how_to_resume(reference: Path, cache: Path, train_urls: str,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "preempted"
    args = _args(train_urls, cache, out, "--batch-size", "16")
    proc = _kill_mid_epoch([*E2KD, *args], out, how=signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.returncode == 143 and "preempted" in stderr and "--resume" in stderr, stderr[-2000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    traced = _trace(out)
    assert (state["epoch"], state["step"]) == (traced[-1]["epoch"] + (traced[-1]["step"] + 1) // 18,
                                               (traced[-1]["step"] + 1) % 18)  # right after the last step taken
    _run([*E2KD, *args, "--resume"])
    assert _weights(out) == _weights(reference) and _trace(out) == _trace(reference)


def test_a_two_rank_run_killed_mid_epoch_resumes_on_one_rank(reference: Path, cache: Path, train_urls: str,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "elastic"
    _kill_mid_epoch([*TORCHRUN, "--master_port", "29543", "-m", "e2kd.cli",
                     *_args(train_urls, cache, out, "--batch-size", "8")], out)
    assert not (out / "student.safetensors").exists()
    result = subprocess.run([*E2KD, *_args(train_urls, cache, out, "--batch-size", "4", "--resume")],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 1 and "global batch" in result.stderr  # a different global batch: one line
    _run([*E2KD, *_args(train_urls, cache, out, "--batch-size", "16", "--resume")])
    assert _trace(out) == _trace(reference)  # the same global batches, the first ones on two ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * (300 // 16) and summary["world_size"] == 1


def test_one_input_shard_on_two_ranks(cache: Path, digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "one-shard"
    data = f"{digits}/train-000000.tar"  # 50 samples, one shard, two ranks
    _run([*TORCHRUN, "--master_port", "29545", "-m", "e2kd.cli", *_args(data, cache, out, "--batch-size", "8")])
    trace = _trace(out)
    assert len(trace) == 2 * (50 // 16) and all(len(t["keys"]) == 16 for t in trace)
    first = [k for t in trace if t["epoch"] == 0 for k in t["keys"]]
    assert len(set(first)) == len(first) == 48  # every sample of the one shard once, on two ranks


def _plan_and_spec(cache: Path, train_urls: str) -> tuple[JoinPlan, StreamSpec]:
    """The join plan of the digits train shards with the cache, and a training stream spec over them."""
    from e2kd.pipeline._loader import plan_join
    from e2kd.pipeline._sources import list_shards
    from e2kd.storage import open_store

    store, shards = open_store(str(cache)), list_shards(train_urls)
    plan = plan_join(shards, store)
    spec = StreamSpec(shards=shards, keys=set(plan.keys), input_size=(64, 64), cache_uri=str(cache),
                      trusted=frozenset(plan.trusted), cache_shards=(tuple(store.shard_names),))
    return plan, spec


def test_workers_live_across_epochs_and_each_epoch_reaches_them(cache: Path, train_urls: str) -> None:
    from e2kd.pipeline._train_stream import build_train_loader

    plan, spec = _plan_and_spec(cache, train_urls)
    order = Order(plan.keys_by_shard(), seed=0, global_batch=16, partitions=8)
    stream, loader = build_train_loader(spec, order, 3, workers=2)
    pids = []
    for epoch, start in ((0, 0), (1, 0), (2, 1)):
        stream.set_epoch(epoch, start)
        keys = [list(batch["key"]) for batch in loader]
        assert keys == [_keys(order.global_batch_items(epoch, s)) for s in range(start, 3)], epoch
        pids.append(sorted(w.pid for w in loader.loader._iterator._workers))
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 2  # the same two worker processes every epoch


def test_workers_that_cannot_split_the_partitions_evenly_are_reduced_with_a_warning(cache: Path,
                                                                                     train_urls: str) -> None:
    from e2kd.pipeline._order import usable_workers
    from e2kd.pipeline._train_stream import build_train_loader
    from e2kd.training._loop import training_order

    assert [usable_workers(w, 1, 8) for w in (0, 1, 2, 3, 5, 8, 14)] == [0, 1, 2, 2, 4, 8, 8]
    assert usable_workers(14, 2, 8) == 4  # each of 2 ranks reads 4 of the 8 partitions
    plan, spec = _plan_and_spec(cache, train_urls)
    order = training_order(plan.keys_by_shard(), seed=0, batch_size=16, world=1, workers=3)  # 3 ∤ 16: no error
    with pytest.warns(UserWarning, match=r"--workers 3: 2 DataLoader workers used"):
        stream, loader = build_train_loader(spec, order, 2, workers=3)
    stream.set_epoch(0)
    assert [list(b["key"]) for b in loader] == [_keys(order.global_batch_items(0, s)) for s in range(2)]


def test_partitions_in_the_same_shard_at_once_share_its_records(cache: Path, train_urls: str) -> None:
    from collections import Counter

    from e2kd.pipeline._train_stream import TrainStream

    plan, spec = _plan_and_spec(cache, train_urls)
    order = Order(plan.keys_by_shard(), seed=0, global_batch=16, partitions=8)
    stream = TrainStream(spec, order, order.steps_per_pass, 0)
    reads: Counter[str] = Counter()
    real = stream.base._records
    stream.base._records = lambda shard: (reads.update([shard.name]), real(shard))[1]  # type: ignore[method-assign]
    pulled: Counter[str] = Counter()  # undecoded records read from each input shard

    class Counted:
        def __init__(self, shard: object) -> None:
            self.shard = shard

        def raw(self):  # noqa: ANN202
            for raw in self.shard.raw():  # type: ignore[attr-defined]
                pulled[self.shard.name] += 1  # type: ignore[attr-defined]
                yield raw

    stream.base.local = Counted  # type: ignore[method-assign, assignment]
    cut = {item.shard for step in range(order.steps_per_pass) for p in range(8)
           for item in order.partition_items(0, step, p)}
    spans = Counter(name for p in range(8) for name in {item.shard for step in range(order.steps_per_pass)
                                                         for item in order.partition_items(0, step, p)})
    assert max(spans.values()) > 1  # the layout does cut shards between partitions
    stream.set_epoch(0)
    keys = [k for batch in stream for k in batch["key"]]
    assert len(keys) == order.steps_per_pass * 16
    # every shard read, and fewer reads than one per (partition, shard): readers in a shard at the same time share
    # its records (a reader that enters a shard after the others left it reads it again)
    assert set(reads) == cut and sum(reads.values()) < sum(spans.values()), (reads, spans)
    # and one scan of each shard's undecoded records serves all its readers: every record read once in the pass
    # (here every shard is one block, and a shard's readers overlap in time)
    assert pulled == Counter({s.name: sum(1 for _ in s.raw()) for s in spec.shards}), pulled

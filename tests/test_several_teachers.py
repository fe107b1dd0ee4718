"""One student, several teachers: caches of the same inputs joined by key. With --lambda 0 a two-cache run equals
a run from one cache holding the log of the teachers' mixture; caches that do not join are refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TEACHER_KWARGS, cache_options

from e2kd.cli import main
from e2kd.storage import get_format, open_store
from e2kd.storage._files import checksum_local_dir

STUDENT = ["--student", "resnet18", "--student-kwargs", json.dumps({"channels": [8, 8, 16, 32], "stem_width": 8,
                                                                    "output_stride": 16})]
WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def two(digits: Path, teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two teachers' 2-view caches of the same inputs (two checkpoints), the same views."""
    from safetensors.torch import save_file

    from e2kd.models import create_model
    from e2kd.stages._cache_teacher import run_cache_teacher

    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(1)  # a second teacher: other weights (the views, drawn by --seed, are the same)
    save_file(create_model("resnet18", 10, **TEACHER_KWARGS).state_dict(), root / "b.safetensors")
    data = f"{digits}/train-{{000000..000001}}.tar"
    out = {"a": root / "a", "b": root / "b"}
    run_cache_teacher(cache_options(data, out["a"], teacher_ckpt, workers=1))
    run_cache_teacher(cache_options(data, out["b"], root / "b.safetensors", workers=1))
    return out


def _mixture_cache(two: dict[str, Path], out: Path) -> Path:
    """Cache a with its logits replaced by log(0.7·softmax(z_a) + 0.3·softmax(z_b)) (and its target by their
    argmax), checksums re-signed: what KD towards the mixture would read from one cache."""
    shutil.copytree(two["a"], out)
    a, b = open_store(str(two["a"])), open_store(str(two["b"]))
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in a.shard_names:
        keys_a, cols_a = a.shard_columns(shard)
        keys_b, cols_b = b.shard_columns(shard)
        assert keys_a == keys_b
        mix = WEIGHTS[0] * torch.softmax(torch.from_numpy(cols_a["logits"].astype(np.float32)), -1) + \
            WEIGHTS[1] * torch.softmax(torch.from_numpy(cols_b["logits"].astype(np.float32)), -1)
        logits = mix.log().numpy().astype(np.float16)
        cols = {**cols_a, "logits": logits, "target": logits.astype(np.float32).argmax(-1).astype(np.int32)}
        shutil.rmtree(out / "shards" / shard / "data.zarr")  # rewritten by e2kd's own shard format
        get_format("zarr").write(out / "shards" / shard, cols, keys_a, a.manifest.encoding)
        sha, nbytes = checksum_local_dir(out / "shards" / shard)
        manifest["shards"][shard].update(sha256=sha, bytes=nbytes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _train(*args: str) -> None:
    result = CliRunner().invoke(main, ["train-student", *STUDENT, "--epochs", "1", "--batch-size", "16", "--quiet",
                                       "--opt", "sgd", "--lr", "0.05", "--warmup-epochs", "0", "--steps-per-epoch",
                                       "4", *args])
    assert result.exit_code == 0, result.output


def test_two_teachers_at_lambda_0_equal_one_cache_of_their_mixture(two: dict[str, Path], digits: Path,
                                                                    tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = f"{digits}/train-{{000000..000001}}.tar"
    mixture = _mixture_cache(two, tmp_path / "mixture")
    _train("--data", data, "--cache", str(two["a"]), "--cache", str(two["b"]), "--cache-weights", "0.7,0.3",
           "--lambda", "0", "--out", str(tmp_path / "two"))
    _train("--data", data, "--cache", str(mixture), "--lambda", "0", "--out", str(tmp_path / "one"))
    kd = [[json.loads(ln)["kd"] for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
          for run in ("two", "one")]
    np.testing.assert_allclose(kd[0], kd[1], rtol=2e-3)
    _train("--data", data, "--cache", str(two["a"]), "--lambda", "0", "--out", str(tmp_path / "a-only"))
    runs = {r: load_file(tmp_path / r / "student.safetensors") for r in ("two", "one", "a-only")}

    def gap(x: str, y: str) -> float:
        return max(float((runs[x][k].float() - runs[y][k].float()).abs().max()) for k in runs[x])

    for name in runs["two"]:  # equal up to the float16 rounding of the mixture cache's logits …
        torch.testing.assert_close(runs["two"][name], runs["one"][name], rtol=1e-2, atol=1e-3)
    # … while one teacher alone ends elsewhere (20× under the batches of e2kd 0.3's order; ~10× under the global
    # order of issue 23: the same measure, other batches)
    assert gap("two", "a-only") > 8 * gap("two", "one"), (gap("two", "a-only"), gap("two", "one"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["cache_ids"] == [open_store(str(two[k])).cache_id for k in ("a", "b")]
    assert summary["cache_weights"] == pytest.approx(list(WEIGHTS))


def test_two_teachers_explain_each_their_own_class(two: dict[str, Path], digits: Path, tmp_path: Path) -> None:
    data = f"{digits}/train-{{000000..000001}}.tar"
    _train("--data", data, "--cache", str(two["a"]), "--cache", str(two["b"]), "--lambda", "1", "--out",
           str(tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["expl"] > 0 and 1 <= metrics["student_explanations"] <= 2  # 2 where the teachers disagree


def test_caches_that_do_not_join_are_refused_in_one_line(two: dict[str, Path], digits: Path, tmp_path: Path) -> None:
    data = f"{digits}/train-{{000000..000001}}.tar"
    cases = {"views.seed is 0 vs 1": lambda m: m["views"].update(seed=1),
             "input size (64, 64) vs (96, 96)": lambda m: m["preprocessing"].update(input_size=[96, 96])}
    for words, change in cases.items():
        other = tmp_path / words.split()[0]
        shutil.copytree(two["b"], other)
        manifest = json.loads((other / "manifest.json").read_text())
        change(manifest)
        (other / "manifest.json").write_text(json.dumps(manifest))
        result = CliRunner().invoke(main, ["train-student", "--data", data, "--cache", str(two["a"]), "--cache",
                                           str(other), *STUDENT, "--out", str(tmp_path / "run"), "--quiet"])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and words in lines[0], result.output
    for args, words in ((["--cache-weights", "1,2,3"], "needs 2 positive weight(s)"),
                        (["--expect-cache-id", "abc"], "given 1 time(s) for 2 caches")):
        result = CliRunner().invoke(main, ["train-student", "--data", data, "--cache", str(two["a"]), "--cache",
                                           str(two["b"]), *STUDENT, "--out", str(tmp_path / "run"), *args])
        assert result.exit_code == 1 and words in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_evaluate_and_show_take_the_same_cache_list(two: dict[str, Path], digits: Path, tmp_path: Path) -> None:
    data = f"{digits}/train-{{000000..000001}}.tar"
    _train("--data", data, "--cache", str(two["a"]), "--cache", str(two["b"]), "--lambda", "0", "--out",
           str(tmp_path / "run"))
    result = CliRunner().invoke(main, ["evaluate", "--data", data, "--run", str(tmp_path / "run"), "--cache",
                                       str(two["a"]), "--cache", str(two["b"]), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert {"agreement", "agreement_2", "expl_sim", "expl_sim_2"} <= set(metrics)
    assert metrics["cache_ids"] == [open_store(str(two[k])).cache_id for k in ("a", "b")]
    key = next(iter(open_store(str(two["a"])).keys()))
    result = CliRunner().invoke(main, ["show", str(two["a"]), "--cache", str(two["b"]), "--key", key, "--data", data,
                                       "--run", str(tmp_path / "run"), "--out", str(tmp_path / "k.png")])
    assert result.exit_code == 0 and (tmp_path / "k.png").stat().st_size > 0, result.output

"""A store never deletes what it did not write: every writing command refuses a non-empty directory that is not
its own (with or without --overwrite), and a store's clean-up removes only shards that carry e2kd's marker."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import S3, TEACHER_KWARGS

from e2kd.cli import main
from e2kd.storage import create_store, open_store

STUDENT = ["--student", "resnet18", "--student-kwargs", json.dumps(TEACHER_KWARGS)]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its content (what must survive untouched)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _one_error_line(code: int, out: str, *words: str) -> None:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert code == 1 and lines[-1].startswith("Error:") and "Traceback" not in out, out
    assert all(w in lines[-1] for w in words), lines[-1]


def _cache_args(data: str, out: str, ckpt: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", data, "--out", out, "--teacher", "resnet18", "--num-classes", "10",
            "--teacher-checkpoint", str(ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--input-size", "64",
            "--batch-size", "16", "--actors", "1", "--quiet", *extra]


@pytest.mark.parametrize("overwrite", [False, True])
def test_cache_teacher_refuses_a_directory_that_is_not_a_store_and_deletes_nothing(
        digits: Path, teacher_ckpt: Path, tmp_path: Path, overwrite: bool, fault_log) -> None:
    user = tmp_path / "u"  # the reproduction: the input itself lives in u/shards/
    (user / "shards" / "sub").mkdir(parents=True)
    shutil.copy(digits / "train-000000.tar", user / "shards" / "train-000000.tar")
    (user / "shards" / "sub" / "keep.tar").write_bytes(b"precious")
    before = _tree(user)
    code, out = _invoke(*_cache_args(str(user / "shards" / "train-000000.tar"), str(user), teacher_ckpt,
                                     *(["--overwrite"] if overwrite else [])))
    _one_error_line(code, out, str(user), "not an e2kd store", "empty it yourself")
    assert _tree(user) == before and sorted(p.name for p in user.iterdir()) == ["shards"]  # nothing added either
    fault_log.record("clear error")


def test_cache_teacher_into_a_file_fails_before_the_teacher_is_built(digits: Path, tmp_path: Path, fault_log) -> None:
    target = tmp_path / "a-file"
    target.write_text("mine")
    missing_ckpt = tmp_path / "no-such-weights.safetensors"  # building the teacher would fail on this instead
    code, out = _invoke(*_cache_args(str(digits / "train-000000.tar"), str(target), missing_ckpt))
    _one_error_line(code, out, str(target), "is a file")
    assert target.read_text() == "mine"
    fault_log.record("clear error")


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_store_cleans_up_only_shards_that_carry_its_marker(tmp_path: Path, fmt: str, fault_log) -> None:
    from test_store_writer import _columns, _manifest

    uri = str(tmp_path / "store")
    with create_store(uri, _manifest(fmt)) as writer:
        writer.record("a", writer.write_shard("a", _columns(2, 0), ["x", "y"], [], source="a"), ["x", "y"])
        writer.write_shard("killed", _columns(1, 1), ["z"], [], source="k")  # committed, never recorded
    foreign = tmp_path / "store" / "shards" / "sub"
    foreign.mkdir()
    (foreign / "keep.tar").write_bytes(b"precious")
    with pytest.warns(UserWarning, match=r"not written by e2kd left in place \(sub\)"):
        with create_store(uri, _manifest(fmt)) as writer:  # resume: the killed run's shard goes, sub stays
            assert writer.complete == {"a"}
    assert sorted(p.name for p in (tmp_path / "store" / "shards").iterdir()) == ["a", "sub"]
    with pytest.warns(UserWarning, match="left in place"):
        with create_store(uri, _manifest(fmt), overwrite=True) as writer:  # --overwrite: the store's shards only
            assert writer.complete == set()
    assert (foreign / "keep.tar").read_bytes() == b"precious"
    assert [p.name for p in (tmp_path / "store" / "shards").iterdir()] == ["sub"]
    fault_log.record("fault survived")


def test_a_commit_never_replaces_a_directory_without_the_marker(tmp_path: Path, fault_log) -> None:
    from test_store_writer import _columns, _manifest

    uri = str(tmp_path / "store")
    with create_store(uri, _manifest()) as writer:
        squatter = tmp_path / "store" / "shards" / "part-0"
        squatter.mkdir(parents=True)
        (squatter / "notes.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="not written by e2kd"):
            writer.write_shard("part-0", _columns(1, 0), ["k"], [], source="p")
    assert (squatter / "notes.txt").read_text() == "mine"
    fault_log.record("clear error")


def test_copy_never_deletes_foreign_entries_locally(cache: Path, tmp_path: Path, fault_log) -> None:
    plain = tmp_path / "plain"  # a user's directory: refused with or without --overwrite
    (plain / "shards" / "sub").mkdir(parents=True)
    (plain / "shards" / "sub" / "keep.tar").write_bytes(b"precious")
    before = _tree(plain)
    for extra in ([], ["--overwrite"]):
        code, out = _invoke("copy", str(cache), str(plain), "--quiet", *extra)
        _one_error_line(code, out, str(plain), "not an e2kd store")
        assert _tree(plain) == before
    store = tmp_path / "store"  # an e2kd store with a foreign sub-folder in shards/: the copy leaves it
    code, out = _invoke("copy", str(cache), str(store), "--quiet")
    assert code == 0, out
    (store / "shards" / "sub").mkdir()
    (store / "shards" / "sub" / "keep.tar").write_bytes(b"precious")
    code, out = _invoke("copy", str(cache), str(store), "--quiet", "--overwrite")
    assert code == 0 and "left in place" in out, out
    assert (store / "shards" / "sub" / "keep.tar").read_bytes() == b"precious" and open_store(str(store)).verify() == []
    fault_log.record("clear error")


def test_copy_never_deletes_foreign_objects_on_s3(cache: Path, s3: S3, fault_log) -> None:
    s3.fs.pipe_file(f"{s3.bucket}/plain/shards/sub/keep.tar", b"precious")
    code, out = _invoke("copy", str(cache), s3.url("plain"), "--quiet", "--storage-options", s3.options_json)
    _one_error_line(code, out, s3.url("plain"), "not an e2kd store")
    assert s3.fs.find(f"{s3.bucket}/plain") == [f"{s3.bucket}/plain/shards/sub/keep.tar"]
    code, out = _invoke("copy", str(cache), s3.url("store"), "--quiet", "--storage-options", s3.options_json)
    assert code == 0, out
    s3.fs.pipe_file(f"{s3.bucket}/store/shards/sub/keep.tar", b"precious")
    code, out = _invoke("copy", str(cache), s3.url("store"), "--quiet", "--overwrite", "--storage-options",
                        s3.options_json)
    assert code == 0, out
    s3.fs.invalidate_cache()
    assert s3.fs.cat_file(f"{s3.bucket}/store/shards/sub/keep.tar") == b"precious"
    fault_log.record("clear error")


@pytest.mark.parametrize("command", ["train-student", "train-teacher"])
def test_training_refuses_a_run_directory_that_holds_no_run(command: str, cache: Path, train_urls: str,
                                                            tmp_path: Path, fault_log) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = (["train-student", "--data", train_urls, "--cache", str(cache), *STUDENT] if command == "train-student"
            else ["train-teacher", "--data", train_urls, "--teacher", "resnet18", "--num-classes", "10",
                  "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--input-size", "64"])
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, text = _invoke(*args, "--out", str(out), "--epochs", "1", "--batch-size", "16", "--quiet", *extra)
        _one_error_line(code, text, str(out), "holds no e2kd run")
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, text = _invoke(*args, "--out", str(afile), "--epochs", "1", "--quiet")
    _one_error_line(code, text, str(afile), "is a file")
    fault_log.record("clear error")


def test_make_dataset_and_demo_refuse_a_directory_they_do_not_own(tmp_path: Path, fault_log) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    code, text = _invoke("make-dataset", "digits-shift", "--out", str(out))
    _one_error_line(code, text, str(out), "did not write")
    code, text = _invoke("demo", "--out", str(out), "--quick")
    _one_error_line(code, text, str(out), "did not write")
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"] and (out / "holiday.jpg").read_bytes() == b"precious"
    fault_log.record("clear error")


def test_a_store_being_created_by_another_writer_is_locked_not_foreign(tmp_path: Path) -> None:
    """Two writers racing into an empty directory: the second sees only the first one's lock (or its temp file)
    and is told the store is locked, never that it is not a store."""
    from e2kd.storage._files import resolve
    from e2kd.storage._ownership import check_store_target, is_store

    for leftover in (".lock", ".lock.tmp-0123abcd", "manifest.json.tmp-77", ".staging"):
        root = tmp_path / leftover.strip(".")
        root.mkdir()
        (root / leftover).write_bytes(b"{}")
        assert is_store(*resolve(str(root))), leftover
        check_store_target(str(root))

"""Schema 2: a cache's contents are data — fields with a kind, a producer and a codec. Several explanations from one
cache-teacher run, each field byte-identical to a single-explainer cache's; a student chooses with --expl-field and
ends bit-identical to one trained from the single-explainer cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import cache_options

from e2kd.cli import main
from e2kd.storage import ManifestError, open_store

STUDENT = ["--student", "resnet18", "--student-kwargs", json.dumps({"channels": [8, 8, 16, 32], "stem_width": 8,
                                                                    "output_stride": 16})]


@pytest.fixture(scope="module")
def caches(digits: Path, teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run's data cached three ways: gradcam, input_x_gradient, and both in one cache."""
    from e2kd.stages._cache_teacher import run_cache_teacher

    root = tmp_path_factory.mktemp("fields")
    data = f"{digits}/train-{{000000..000001}}.tar"
    out = {}
    for name, extra in (("gradcam", {"explainer": "gradcam"}), ("ixg", {"explainer": "input_x_gradient"}),
                        ("both", {"explainers": "gradcam,input_x_gradient"})):
        out[name] = root / name
        run_cache_teacher(cache_options(data, out[name], teacher_ckpt, workers=1, map_size=(4, 4), **extra))
    return out


def test_each_field_of_a_two_explainer_cache_is_the_single_explainer_caches(caches: dict[str, Path]) -> None:
    both, gradcam, ixg = (open_store(str(caches[k])) for k in ("both", "gradcam", "ixg"))
    assert both.manifest.schema_version == 2 and [f.name for f in both.manifest.fields] == [
        "logits", "gradcam", "input_x_gradient"]
    assert both.verify() == [] and both.manifest.map_shapes == {"gradcam": (1, 4, 4), "input_x_gradient": (3, 4, 4)}
    for shard in both.shard_names:
        keys, cols = both.shard_columns(shard)
        g_keys, g_cols = gradcam.shard_columns(shard)
        i_keys, i_cols = ixg.shard_columns(shard)
        assert keys == g_keys == i_keys
        for column in ("labels", "views", "target", "logits", "maps"):
            np.testing.assert_array_equal(cols[column], g_cols[column])
        np.testing.assert_array_equal(cols["input_x_gradient__maps"], i_cols["maps"])
    key = next(iter(both.keys()))
    np.testing.assert_array_equal(both.read(key, "input_x_gradient")["maps"], ixg.read(key)["maps"])
    info = json.loads(CliRunner().invoke(main, ["inspect", str(caches["both"]), "--json"]).output)
    assert info["schema_version"] == 2 and [f["name"] for f in info["fields"]] == ["logits", "gradcam",
                                                                                 "input_x_gradient"]
    assert info["fields"][2]["codec"] == {"name": "map-float16"} and info["fields"][2]["map_shape"] == [3, 4, 4]


def test_a_student_chooses_a_field_and_ends_as_from_the_single_explainer_cache(caches: dict[str, Path], digits: Path,
                                                                                tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = f"{digits}/train-{{000000..000001}}.tar"
    args = ["train-student", "--data", data, *STUDENT, "--epochs", "1", "--batch-size", "16", "--quiet",
            "--lambda", "5", "--steps-per-epoch", "3"]
    runner = CliRunner()
    refused = runner.invoke(main, [*args, "--cache", str(caches["both"]), "--out", str(tmp_path / "none")])
    assert refused.exit_code == 1 and "holds 2 explanation fields (gradcam, input_x_gradient): choose one with " \
                                      "--expl-field" in refused.output, refused.output
    unknown = runner.invoke(main, [*args, "--cache", str(caches["both"]), "--out", str(tmp_path / "none"),
                                   "--expl-field", "bcos"])
    assert unknown.exit_code == 1 and "no explanation field 'bcos'" in unknown.output, unknown.output
    for field, single in (("input_x_gradient", "ixg"),):
        two = runner.invoke(main, [*args, "--cache", str(caches["both"]), "--expl-field", field, "--out",
                                   str(tmp_path / "two")])
        one = runner.invoke(main, [*args, "--cache", str(caches[single]), "--out", str(tmp_path / "one")])
        assert two.exit_code == 0 and one.exit_code == 0, (two.output, one.output)
        a, b = load_file(tmp_path / "two" / "student.safetensors"), load_file(tmp_path / "one" / "student.safetensors")
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
        summary = json.loads((tmp_path / "two" / "summary.json").read_text())
        assert summary["explainer"] == "input_x_gradient"


def test_a_schema_2_manifest_is_validated(caches: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    for change, words in ((lambda m: m["fields"].pop(), "map_shapes name fields that are not"),
                          (lambda m: m["fields"][2].update(name="Grad-CAM"), "field name"),
                          (lambda m: m["fields"][1]["codec"].update(name="map-zip"), "unknown codec 'map-zip'"),
                          (lambda m: m["fields"].append(dict(m["fields"][1])), "duplicate field names")):
        store = tmp_path / "store"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(caches["both"], store)
        manifest = json.loads((store / "manifest.json").read_text())
        change(manifest)
        (store / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match=words):
            open_store(str(store))


def test_bad_field_names_and_codecs_are_one_line_errors_before_any_work(tmp_path: Path) -> None:
    base = ["cache-teacher", "--data", "x.tar", "--out", str(tmp_path / "o"), "--teacher", "resnet18",
            "--num-classes", "3", "--random-teacher"]
    for extra, words in ((["--explainers", "gradcam,Grad-CAM"], "field name 'Grad-CAM' must be lower-case"),
                         (["--explainers", "gradcam,gradcam"], "1 to 8 different explainers"),
                         (["--explainers", "gradcam,nope"], "unknown explainer 'nope'"),
                         (["--map-codec", "map-zip"], "unknown codec 'map-zip'"),
                         (["--map-codec", "logits-float16"], "is a logits codec, not an explanation codec"),
                         (["--map-codec", '{"name": "logits-topk", "kk": 1}'], "unexpected keyword argument 'kk'")):
        result = CliRunner().invoke(main, [*base, *extra])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and words in lines[0], (extra, result.output)
    assert not (tmp_path / "o").exists()


def test_a_bcos_teacher_caches_its_own_maps_and_gradcam(digits: Path, tmp_path: Path) -> None:
    from e2kd.stages._cache_teacher import CacheTeacherOptions, run_cache_teacher

    opts = dict(data=str(digits / "train-000000.tar"), out=str(tmp_path / "bcos"), teacher="bcos:resnet18",
                num_classes=10, random_teacher=True, teacher_kwargs={"inplanes": 8}, explainers="bcos,gradcam",
                input_size=64, map_size=(2, 2), actors=1, progress=False)  # 2x2: a stride-32 net at 64 px
    run_cache_teacher(CacheTeacherOptions(**opts))
    store = open_store(opts["out"])
    assert [f.name for f in store.manifest.fields] == ["logits", "bcos", "gradcam"] and store.verify() == []
    assert store.manifest.map_shapes == {"bcos": (6, 2, 2), "gradcam": (1, 2, 2)}
    assert store.manifest.field_family("gradcam") == "gradcam" and store.manifest.explainer_name == "bcos"
    shown = CliRunner().invoke(main, ["inspect", opts["out"]]).output
    assert "teacher     bcos:resnet18  classes=10  random init (seed 0)" in shown, shown  # not "sha256=None"
    with pytest.raises(ValueError, match="a B-cos model explains itself"):
        CacheTeacherOptions(**{**opts, "explainers": "gradcam,bcos"})

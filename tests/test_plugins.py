"""A codec and an explainer from a module outside e2kd (``E2KD_PLUGINS``) take a cache through cache-teacher →
inspect → verify → train-student, with no change in e2kd — in the CLI and in every Ray actor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import TEACHER_KWARGS

PLUGIN = textwrap.dedent('''
    """A test plug-in: float32 maps, and |∂y/∂x| summed over channels as an explanation."""
    from dataclasses import dataclass
    from typing import ClassVar

    import numpy as np
    import torch

    from e2kd.explain import Explainer, register_explainer
    from e2kd.storage import register_codec


    @register_codec
    @dataclass(frozen=True)
    class Float32Maps:
        name: ClassVar[str] = "map-float32-test"
        kind: ClassVar[str] = "explanation"

        def to_dict(self):
            return {"name": self.name}

        def columns(self, num_views, shape):
            return {"maps": ("float32", (num_views, *shape) if shape is not None else None)}

        def encode(self, values):
            return {"maps": values.astype(np.float32)}

        def decode(self, cols):
            return torch.from_numpy(np.asarray(cols["maps"], dtype=np.float32))

        def check(self, cols, num_classes):
            return None if np.isfinite(cols["maps"]).all() else "non-finite values in column 'maps'"


    @register_explainer
    class GradientNorm(Explainer):
        name = "gradient_norm_test"
        family = "gradient_norm_test"

        def explain(self, inputs, targets, create_graph):
            x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
            logits = self.model(x)
            (grad,) = torch.autograd.grad(self.target_scores(logits, targets), x, create_graph=create_graph)
            return logits, grad.abs().sum(1, keepdim=True)
''')


def test_a_plugin_codec_and_explainer_go_through_every_command(digits: Path, teacher_ckpt: Path,
                                                               tmp_path: Path) -> None:
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "e2kd_test_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "E2KD_PLUGINS": "e2kd_test_plugin", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugin"), os.environ.get("PYTHONPATH", "")])}

    def e2kd(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "e2kd.cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (args[0], proc.stderr[-2000:])
        return proc.stdout

    data, store = f"{digits}/train-{{000000..000001}}.tar", tmp_path / "store"
    e2kd("cache-teacher", "--data", data, "--out", str(store), "--teacher", "resnet18", "--num-classes", "10",
         "--teacher-checkpoint", str(teacher_ckpt), "--teacher-kwargs", json.dumps(TEACHER_KWARGS), "--input-size",
         "64", "--explainer", "gradient_norm_test", "--map-codec", "map-float32-test", "--map-size", "8",
         "--actors", "1", "--quiet")
    info = json.loads(e2kd("inspect", str(store), "--json"))
    assert [(f["name"], f["codec"]["name"]) for f in info["fields"]] == [("logits", "logits-float16"),
                                                                         ("gradient_norm_test", "map-float32-test")]
    assert info["fields"][1]["map_shape"] == [1, 8, 8] and info["num_samples"] == 100
    assert "ok" in e2kd("verify", str(store))
    e2kd("train-student", "--data", data, "--cache", str(store), "--student", "resnet18", "--student-kwargs",
         json.dumps(TEACHER_KWARGS), "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "run"), "--quiet")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["explainer"] == "gradient_norm_test" and summary["final"]["expl"] > 0

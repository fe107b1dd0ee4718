"""The public API is explicit: the packages' exports resolve, everything else is marked internal, and the names the
README and the docs use are importable from where they say."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import e2kd

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ["e2kd.models", "e2kd.losses", "e2kd.explain", "e2kd.storage", "e2kd.pipeline", "e2kd.training",
                  "e2kd.stages"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_exported_name_resolves_and_none_is_internal(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported and len(exported) == len(set(exported))
    assert not [n for n in exported if n.startswith("_")]
    missing = [n for n in exported if getattr(module, n, None) is None]
    assert not missing, f"{name} exports {missing} but has no such attribute"


def test_every_other_module_is_marked_internal() -> None:
    public = {"e2kd", "e2kd.cli", *PUBLIC_MODULES}
    modules = [m.name for m in pkgutil.walk_packages(e2kd.__path__, "e2kd.")]
    assert len(modules) > 50
    unmarked = [m for m in modules if m not in public and not any(p.startswith("_") for p in m.split(".")[1:])]
    assert not unmarked, f"modules neither public nor marked internal: {unmarked}"


def _documentation() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])


def test_the_imports_and_names_the_docs_show_are_importable() -> None:
    text = _documentation()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    imports = [ln.strip() for ln in code.splitlines() if re.match(r"\s*from e2kd[\w.]* import ", ln)]
    imports += re.findall(r"`(from e2kd[\w.]* import \w+(?:, \w+)*)", text)  # inline, e.g. in the store page
    assert len(imports) >= 4
    for line in imports:
        exec(line, {})  # noqa: S102 - the docs' own import lines
    dotted = set(re.findall(r"`(e2kd(?:\.[a-z]\w*)+\.[A-Za-z]\w*)", text))
    public = [d for d in dotted if not any(p.startswith("_") for p in d.split("."))]
    assert len(public) >= 5
    unresolved = []
    for name in public:
        module, _, attr = name.rpartition(".")
        try:
            resolved = getattr(importlib.import_module(module), attr, None)
        except ModuleNotFoundError:
            resolved = None
        if resolved is None and importlib.util.find_spec(name) is None:
            unresolved.append(name)
    assert not unresolved, f"the docs name {unresolved}, which do not resolve"

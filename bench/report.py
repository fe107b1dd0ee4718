"""Write one benchmark's section into bench/RESULTS.md, replacing that section only."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nMeasured side by side in one run per section; regenerate with `make bench`.\n"


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- name -->`` and ``<!-- /name -->``."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)

"""mkdocs hooks for e2kd's site: docstrings use Sphinx roles (:func:`x`), shown as plain code in the API pages."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(?=<code>|`)")


def on_page_content(html: str, **_: Any) -> str:
    """Drop the role prefix before inline code (mkdocstrings renders the docstring's text as it is)."""
    return _ROLE.sub("", html)

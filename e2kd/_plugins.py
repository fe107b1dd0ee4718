"""Plug-ins: codecs, explainers and formats registered by modules outside e2kd.

``E2KD_PLUGINS=mypkg.codecs,mypkg.explainers`` names modules to import before any command runs — in the CLI, in
every Ray actor of cache-teacher, in DataLoader workers (forked, they inherit them). A module registers what it
brings on import (``register_codec``, ``register_explainer``, ``register_format``); nothing in e2kd changes.
"""

from __future__ import annotations

import importlib
import os

__all__ = ["load_plugins", "PLUGINS_ENV"]

PLUGINS_ENV = "E2KD_PLUGINS"


def load_plugins() -> list[str]:
    """Import the modules ``E2KD_PLUGINS`` names (comma-separated; idempotent); return their names.

    Raises:
        ImportError: one names a module that cannot be imported (with the cause).
    """
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of a plug-in's import is reported as one
            raise ImportError(f"{PLUGINS_ENV}: cannot import {name!r}: {type(exc).__name__}: {exc}") from None
    return names

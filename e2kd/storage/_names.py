"""Shard names: one rule for what a store may contain, and a safe, injective name for any input file.

A store shard lives at ``STORE/shards/<name>``. The writer derives ``<name>`` from the input shard's file
name and the reader refuses anything else, so both use :func:`is_valid_shard_name`. An input file whose
name is not already valid (``...tar``, ``a b;c.tar``, ``ü.tar``) gets a sanitised name plus a short hash
of the original, so distinct inputs never share a shard.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["is_valid_shard_name", "check_shard_name", "shard_name_for"]

_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def is_valid_shard_name(name: object) -> bool:
    """A plain file name: starts alphanumeric, then ``[A-Za-z0-9._-]``, at most 200 characters, no ``..``."""
    return isinstance(name, str) and bool(_VALID.match(name)) and ".." not in name


def check_shard_name(name: object) -> str:
    """Return ``name`` if valid, else raise ``ValueError`` naming it."""
    if not is_valid_shard_name(name):
        raise ValueError(f"unsafe shard name {name!r}: a shard name must match [A-Za-z0-9][A-Za-z0-9._-]* "
                         f"without '..'")
    return str(name)


def shard_name_for(base: str) -> str:
    """The shard name of an input whose file name (extension removed) is ``base``.

    Valid names are kept as they are (stores written before stay readable); any other gets its unsafe
    characters replaced and ``-<10 hex digits of sha256(base)>`` appended.

    Example:
        >>> shard_name_for("train-000001"), shard_name_for("..")
        ('train-000001', 'shard-5ec1f7e700')
    """
    if is_valid_shard_name(base):
        return base
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base)
    while ".." in cleaned:
        cleaned = cleaned.replace("..", "_")
    cleaned = cleaned.lstrip("._-")[:150]
    digest = hashlib.sha256(base.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return check_shard_name(f"{cleaned}-{digest}" if cleaned else f"shard-{digest}")

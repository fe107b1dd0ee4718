"""Storage options for object stores (``s3://``, ``gs://``, ``az://``, any fsspec protocol).

Endpoint and credentials come the usual way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, …) or from
``--storage-options`` (a JSON object of fsspec filesystem arguments, e.g. ``{"endpoint_url": "http://…"}``).
They are applied process-wide through ``fsspec.config.conf``, so every open of a URL of that protocol — stores,
input shards, DataLoader workers forked from this process — uses them; Ray actors get the same dictionary and
apply it themselves.

The values are secrets: they are never written into a manifest, ``summary.json``, ``metrics.jsonl``, a log
line or an error message (:func:`describe_storage_options` is what may be recorded: the key names only).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import fsspec

__all__ = ["StorageOptions", "parse_storage_options", "resolve_storage_options", "apply_storage_options",
           "describe_storage_options", "url_protocols", "is_credentials_error", "credentials_message"]

#: ``protocol → fsspec filesystem arguments`` (what :func:`apply_storage_options` installs).
StorageOptions = dict[str, dict[str, Any]]

_LOCAL = {"file", "local"}


def parse_storage_options(text: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``--storage-options`` JSON → dict. The error never repeats the text (it may hold a secret)."""
    if text is None or isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--storage-options is not valid JSON (at line {getattr(exc, 'lineno', '?')}, column "
                         f"{getattr(exc, 'colno', '?')}); the value is not shown, it may hold credentials") from None
    if not isinstance(value, dict):
        raise ValueError(f"--storage-options must be a JSON object, got a {type(value).__name__}")
    return value


def url_protocols(urls: Iterable[str | None]) -> set[str]:
    """The non-local fsspec protocols named in ``urls`` (every part of a chained ``a::b://…`` URL)."""
    found: set[str] = set()
    for url in urls:
        if not url:
            continue
        for part in str(url).replace("\n", ",").split(","):
            for link in part.strip().split("::"):
                protocol, _ = fsspec.core.split_protocol(link)
                if protocol and protocol not in _LOCAL and not link.startswith("pipe:"):
                    found.add(protocol)
    return found


def resolve_storage_options(options: dict[str, Any] | None, urls: Iterable[str | None]) -> StorageOptions:
    """Which filesystem arguments go to which protocol.

    ``{"s3": {...}, "gs": {...}}`` (every key a known fsspec protocol, every value an object) is taken per
    protocol; any other object applies to every object-store protocol in ``urls``.
    """
    if not options:
        return {}
    known = set(fsspec.available_protocols())
    if all(k in known and isinstance(v, dict) for k, v in options.items()):
        return {k: dict(v) for k, v in options.items()}
    protocols = url_protocols(urls)
    return {p: dict(options) for p in sorted(protocols)}


def apply_storage_options(per_protocol: StorageOptions | None) -> None:
    """Install ``per_protocol`` as this process's fsspec defaults (idempotent; ``None``/``{}`` does nothing)."""
    for protocol, kwargs in (per_protocol or {}).items():
        fsspec.config.conf.setdefault(protocol, {}).update(kwargs)


def describe_storage_options(options: dict[str, Any] | None) -> list[str] | None:
    """What a run may record about its storage options: the key names, never the values."""
    if not options:
        return None
    return sorted(options)


_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "DefaultCredentialsError", "ClientAuthenticationError")
_CREDENTIAL_TEXT = ("Unable to locate credentials", "NoCredentialsError", "Partial credentials found",
                    "Could not automatically determine credentials")


def is_credentials_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says that no usable credentials were found."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _CREDENTIAL_ERRORS or any(t in str(current) for t in _CREDENTIAL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def credentials_message(urls: Iterable[str | None]) -> str:
    """One line: which URLs found no credentials, and the ways to pass them (never any value)."""
    remote = sorted({str(u) for u in urls if u and url_protocols([u])})
    where = ", ".join(remote) if remote else "the object store"
    return (f"no credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; "
            f"GOOGLE_APPLICATION_CREDENTIALS for gs://), or pass --storage-options '{{\"key\": …, \"secret\": …}}' "
            f"(also E2KD_STORAGE_OPTIONS)")


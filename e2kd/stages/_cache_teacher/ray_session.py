"""Starting or joining Ray the way e2kd wants it: private local cluster by default, capped, no dashboard."""

from __future__ import annotations

import logging
import os

__all__ = ["ensure_ray", "check_ray_address"]


def check_ray_address(address: str | None, timeout_s: float = 3.0) -> None:
    """Fail in one line, before any work, where ``--ray-address`` has no Ray cluster to answer (Ray itself would
    retry for about 20 s printing warnings). ``None`` (a private local Ray) needs nothing.

    Raises:
        RuntimeError: naming the address and what to do.
    """
    import socket

    if not address or address == "local":
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray._private.services import canonicalize_bootstrap_address

    hint = "start one with `ray start --head`, or leave out --ray-address for a private local Ray"
    target = address.removeprefix("ray://")
    try:
        resolved = canonicalize_bootstrap_address(target) if not address.startswith("ray://") else target
    except Exception as exc:  # noqa: BLE001 - a malformed address or an unreadable cluster file: one line
        raise RuntimeError(f"--ray-address {address}: {exc}; {hint}") from None
    if resolved is None:
        raise RuntimeError(f"--ray-address {address}: no running Ray cluster found on this machine; {hint}")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"--ray-address {address}: no Ray cluster answers at {resolved} ({exc}); {hint}") from None


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_memory: int = 512 * 1024 * 1024) -> None:
    """Initialise Ray once per process.

    Args:
        address: ``None`` starts a private local Ray (``address="local"``: never joins a cluster that
            ``ray start`` left running); ``"auto"`` or ``HOST:PORT`` joins an existing cluster.
        num_cpus: CPUs of the local Ray (default: this machine's).
        object_store_memory: cap of the local object store (bytes).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=object_store_memory,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)

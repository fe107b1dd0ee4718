"""Starting or joining Ray the way e2kd wants it: private local cluster by default, capped, no dashboard."""

from __future__ import annotations

import os

__all__ = ["ensure_ray"]


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
        ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=object_store_memory,
                 include_dashboard=False, logging_level="warning", log_to_driver=True)

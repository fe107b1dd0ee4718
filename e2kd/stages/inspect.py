"""``e2kd inspect``: a summary of a cache from its manifest."""

from __future__ import annotations

from typing import Any

from e2kd.storage import open_store

__all__ = ["summarise_store"]


def summarise_store(uri: str) -> dict[str, Any]:
    """Manifest summary: counts, completeness, bytes per sample per view, one entry per shard.

    Each complete shard's key count is checked against the manifest, so the summary never over-reports.
    """
    store = open_store(uri)
    store.index  # noqa: B018 - one key file per shard: a count that disagrees with the manifest fails here
    m = store.manifest
    shards = [{"name": n, "num_samples": r["num_samples"], "errors": r["num_errors"], "sha256": r["sha256"],
               "bytes": r["bytes"], "complete": r["complete"], "source": r["source"]}
              for n, r in sorted(m["shards"].items())]
    n = sum(s["num_samples"] for s in shards if s["complete"])
    nbytes = sum(s["bytes"] for s in shards if s["complete"])
    views = m["views"]["k"]
    return {"num_samples": n, "num_views": views, "num_classes": m["teacher"]["num_classes"], "teacher": m["teacher"],
            "explainer": m["explainer"], "map_shape": m["map_shape"], "bytes": nbytes,
            "bytes_per_sample_view": nbytes / max(1, n * views),
            "errors": sum(s["errors"] for s in shards if s["complete"]), "shards": shards,
            "bad_labels": sum(r.get("num_bad_labels", 0) for r in m["shards"].values() if r["complete"]),
            "complete_shards": sum(s["complete"] for s in shards), "views": m["views"], "encoding": m["encoding"],
            "format": m["format"], "schema_version": m["schema_version"], "e2kd_version": m["e2kd_version"],
            "preprocessing": m["preprocessing"], "inputs": m["inputs"]}

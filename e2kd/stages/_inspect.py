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
    shards = [{"name": n, "num_samples": r.num_samples, "errors": r.num_errors, "sha256": r.sha256,
               "bytes": r.nbytes, "complete": r.complete, "source": r.source} for n, r in sorted(m.shards.items())]
    complete = [m.shards[n] for n in m.complete_shards]
    n = sum(r.num_samples for r in complete)
    nbytes = sum(r.nbytes for r in complete)
    return {"cache_id": store.cache_id, "num_samples": n, "num_views": m.num_views, "num_classes": m.num_classes,
            "teacher": m.teacher,
            "explainer": m.explainer, "map_shape": list(m.map_shape) if m.map_shape else None, "bytes": nbytes,
            "bytes_per_sample_view": nbytes / max(1, n * m.num_views),
            "errors": sum(r.num_errors for r in complete), "shards": shards,
            "bad_labels": sum(r.num_bad_labels for r in complete), "complete_shards": len(complete),
            "views": m.views, "encoding": m.encoding.to_dict(), "format": m.format,
            "codecs": {"logits": m.encoding.logits_codec.to_dict(), "maps": m.encoding.map_codec.to_dict()},
            "fields": [{**f.to_json(), "map_shape": list(shape) if (shape := m.map_shapes.get(f.name)) else None}
                       if f.kind == "explanation" else f.to_json() for f in m.fields],
            "schema_version": m.schema_version, "e2kd_version": m.e2kd_version, "preprocessing": m.preprocessing,
            "inputs": m.inputs, "class_names": list(m.class_names) if m.class_names else None}

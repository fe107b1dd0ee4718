"""Teacher caches: a manifest plus one self-contained shard per input shard (Zarr v3 or WebDataset tar)."""

from e2kd.storage.encoding import Encoding
from e2kd.storage.manifest import ManifestError
from e2kd.storage.reader import CacheStore, StoreIntegrityError, open_store

__all__ = ["open_store", "CacheStore", "Encoding", "ManifestError", "StoreIntegrityError"]

"""Teacher caches: a manifest plus one self-contained shard per input shard (Zarr v3 or WebDataset tar).

Reading: :func:`open_store` → :class:`CacheStore`. Writing: :func:`create_store` → :class:`CacheWriter`.
Handing over: :func:`copy_store` (shard by shard, verified, manifest last). Object storage: any fsspec URL.
Formats: :func:`list_formats`, :func:`get_format`, :func:`register_format`. Codecs (how logits and maps
become columns): :func:`list_codecs`, :func:`get_codec`, :func:`register_codec`. Nothing here imports models,
explainers, losses or stages.
"""

from e2kd.storage._codecs import Codec, get_codec, list_codecs, register_codec
from e2kd.storage._copy import CopyReport, copy_store
from e2kd.storage._encoding import MAP_DTYPES, Encoding
from e2kd.storage._formats import ShardFormat, get_format, list_formats, register_format
from e2kd.storage._manifest import PRECISIONS, CompatibilityError, Manifest, ManifestError, ShardRecord
from e2kd.storage._names import shard_name_for
from e2kd.storage._reader import CachedRecord, CacheStore, StoreIntegrityError, open_store
from e2kd.storage._writer import CacheWriter, ShardWriter, create_store

__all__ = ["open_store", "CacheStore", "CachedRecord", "create_store", "CacheWriter", "ShardWriter", "Manifest",
           "ShardRecord", "Encoding", "ManifestError", "CompatibilityError", "StoreIntegrityError", "ShardFormat",
           "get_format", "list_formats", "register_format", "MAP_DTYPES", "PRECISIONS", "shard_name_for", "copy_store",
           "CopyReport", "Codec", "register_codec", "get_codec", "list_codecs"]

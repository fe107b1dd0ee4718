"""Data: input sources, views and their rendering, the training order and the student's loader.

Sources (:func:`list_shards` → :class:`InputShard` s of :class:`Sample` s), views (:class:`ViewPolicy`,
:func:`render_view`: one renderer for teacher and student), the join of inputs with a cache (:func:`plan_join`,
:class:`StreamSpec`), the order of global batches (:class:`Order`) and the student's loader
(:func:`build_train_loader`; :class:`DeviceImages` decodes on the training device). The modules with a leading
underscore are internal.
"""

from e2kd.pipeline._datasets import make_digits_shift
from e2kd.pipeline._device_images import DeviceImages
from e2kd.pipeline._loader import JoinPlan, StreamSpec, StudentStream, build_loader, plan_join, teacher_maps
from e2kd.pipeline._order import Item, Order, default_partitions
from e2kd.pipeline._sources import (
    BadSample,
    EncodedImage,
    FolderShard,
    InputShard,
    InputShardError,
    Sample,
    TarShard,
    decode_image,
    iter_shard,
    list_shards,
    read_header,
)
from e2kd.pipeline._student_cache import StudentCache, open_student_cache, open_student_caches
from e2kd.pipeline._train_stream import RankLoader, TrainStream, build_train_loader, endless_batches
from e2kd.pipeline._views import (
    FULL_VIEW,
    RENDER_SPEC,
    View,
    ViewPolicy,
    apply_crop,
    crop_map,
    crop_weights,
    crop_weights_batch,
    draw_view,
    draw_views,
    render_view,
    render_view_uint8,
    render_views_batch,
    to_unit_float,
)

__all__ = ["list_shards", "InputShard", "TarShard", "FolderShard", "Sample", "BadSample", "EncodedImage",
           "InputShardError", "iter_shard", "decode_image", "read_header", "View", "ViewPolicy", "FULL_VIEW",
           "RENDER_SPEC", "draw_view", "draw_views", "render_view", "render_view_uint8", "render_views_batch",
           "to_unit_float", "crop_map", "crop_weights", "crop_weights_batch", "apply_crop", "JoinPlan", "plan_join",
           "StreamSpec", "StudentStream", "build_loader", "teacher_maps", "Order", "Item", "default_partitions",
           "TrainStream", "RankLoader", "build_train_loader", "endless_batches", "DeviceImages", "StudentCache",
           "open_student_cache", "open_student_caches", "make_digits_shift"]

"""``e2kd cache-teacher``: the stage (``stage.py``), its Ray actor (``worker.py``), Ray set-up (``ray_session.py``)."""

from e2kd.stages._cache_teacher.stage import CacheTeacherOptions, run_cache_teacher
from e2kd.stages._cache_teacher.worker import TeacherWorker, WorkerSpec

__all__ = ["CacheTeacherOptions", "run_cache_teacher", "TeacherWorker", "WorkerSpec"]

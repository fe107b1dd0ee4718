"""The stages' options, each declared once (:func:`e2kd._options.option`): type, default, help, range and former
names in one field, from which the CLI makes its flags and ``--config`` reads its YAML keys. No heavy imports: the
CLI builds ``--help`` from these classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from e2kd._options import check_options, former_names, option
from e2kd.storage import MAP_DTYPES, PRECISIONS, Encoding, list_formats

if TYPE_CHECKING:
    from e2kd.pipeline._views import ViewPolicy
    from e2kd.storage import Codec

__all__ = ["CacheTeacherOptions", "TeacherOptions", "TrainOptions", "EXPL_RESOLUTIONS"]

_CHECKPOINT_EVERY = ("Also checkpoint every N optimiser steps within an epoch (RUN/checkpoint.pt, replaced "
                     "atomically); --resume continues from that exact sample. SIGTERM always checkpoints after the "
                     "current step and stops")
_TRACE_KEYS = ("Write one JSON line per global step: {epoch, step, keys} (the whole global batch, in order; rank 0). "
               "A resumed run appends from where it resumed.")
_TENSORBOARD = ("Also write TensorBoard event files here: losses and lr per step, the epoch's metrics, and "
                "(train-student) a few teacher/student explanation images per epoch. Needs the tensorboard package "
                "(pip install 'e2kd[tensorboard]').")
_PARTITIONS = ("Partitions of the sample order: must divide the global batch and be a multiple of ranks × workers; "
               "runs with equal seed, global batch and partitions see the same batches")


@dataclass
class TeacherOptions:
    """Options of ``train-teacher``: plain supervised training (the student's loop with a cross-entropy
    objective)."""

    ALIASES: ClassVar[dict[str, str]] = {}  #: former name → option (set below from the fields)

    data: str = option(help="Labelled training shards (or an image folder).")
    teacher: str = option(help="timm model name or bcos:<name>.", former=("--model",))
    num_classes: int = option(help="Class count.", lo=1)
    out: str = option(help="Run directory: teacher.safetensors, metrics.jsonl, checkpoint.pt, summary.json.")
    teacher_kwargs: dict[str, Any] = option(default_factory=dict, help="JSON kwargs of the model constructor.",
                                            former=("--model-kwargs",))
    input_size: int = option(224, lo=8)
    epochs: int = option(25, lo=1)
    batch_size: int = option(64, lo=1)
    lr: float = option(3e-3, lo=0, exclusive_lo=True)
    weight_decay: float = option(0.05, lo=0)
    opt: str = option("adamw", help="timm optimiser name")
    sched: str = option("cosine", help="timm scheduler name")
    warmup_epochs: int = option(1, lo=0)
    label_smoothing: float = option(0.1, lo=0, hi=1)
    crop_scale: tuple[float, float] = option((0.7, 1.0), help="Random-resized-crop area range")
    flip_p: float = option(0.0, help="Flip probability", lo=0, hi=1, default_text="0")
    val_data: str | None = option(None, help="Validation shards (top-1 per epoch).")
    seed: int = option(0)
    workers: int = option(0, help="DataLoader workers", lo=0)
    resume: bool = option(False, help="Continue from OUT/checkpoint.pt.")
    overwrite: bool = option(False, help="Replace an existing run in OUT (refused without it or --resume).")
    progress: bool = option(True, cli=False)  # --quiet turns it off
    checkpoint_every: int = option(0, help=_CHECKPOINT_EVERY, lo=0, default_text="0: at epoch ends only")
    trace_keys: str | None = option(None, help=_TRACE_KEYS, path="file")
    tensorboard: str | None = option(None, help=_TENSORBOARD, path="dir")
    partitions: int | None = option(None, help=_PARTITIONS, lo=1, default_text="the smallest such multiple ≥ 8")

    def __post_init__(self) -> None:
        from e2kd._config import check_crop_scale

        check_options(self)
        check_crop_scale(self.crop_scale)


_STORAGE_OPTIONS = ('JSON fsspec arguments for s3:// (gs://, az://, …) URLs, e.g. \'{"endpoint_url": '
                    '"http://host:9000"}\' (default: the usual AWS_* variables and profiles). Never recorded or '
                    'printed.')
#: ``--expl-resolution``'s choices (the same as ``e2kd.losses.EXPL_RESOLUTIONS``; a test keeps them equal).
EXPL_RESOLUTIONS = ("input", "native")


@dataclass(kw_only=True)
class TrainOptions:
    """Options of ``train-student``: KD + λ·explanation loss from cached teacher outputs (or a live teacher, as a
    baseline). ``--cache`` and ``--expect-cache-id`` given several times are lists (one per teacher)."""

    ALIASES: ClassVar[dict[str, str]] = {}  #: former name → option (set below from the fields)

    data: str = option(help="Training images: the shards (or image folder) the cache was built from.")
    cache: str | list[str] | None = option(None, multiple=True, help="Teacher cache (from cache-teacher); once per "
                                           "teacher to learn from several (caches of the same inputs, joined by key).")
    cache_weights: str | None = option(None, default_text="equal", help="Several --cache: each teacher's weight, e.g. "
                                       "0.7,0.3 (KD towards the weighted mixture; explanation terms weighted alike)")
    student: str = option(help="timm model name or bcos:<name>.")
    out: str = option(help="Run directory: metrics.jsonl, checkpoint.pt, student.safetensors, summary.json.")
    student_kwargs: dict[str, Any] = option(default_factory=dict, help="JSON kwargs for the student constructor.")
    student_init: str | None = option(None, path="any", help="Initial student weights: a weights file, or a run "
                                      "directory (its summary.json supplies --student and --student-kwargs too; "
                                      "given flags must agree).")
    num_classes: int | None = option(None, lo=1, help="Default: the cache's; must agree with it.")
    explainer: str | None = option(None, help="Student explainer. Default: the cache field's; must be of the same "
                                   "family.")
    expl_field: str | None = option(None, help="The cache's explanation field to match (`e2kd inspect` lists them; "
                                    "needed where a cache holds several, e.g. cached with --explainers "
                                    "gradcam,input_x_gradient).")
    input_size: int | None = option(None, lo=8, help="Default: the cache's; must agree with a K-view cache.")
    epochs: int = option(10, lo=1)
    batch_size: int = option(64, lo=1)
    lr: float = option(1e-3, lo=0, exclusive_lo=True)
    weight_decay: float = option(1e-4, lo=0)
    opt: str = option("adamw", help="timm optimiser name")
    sched: str = option("cosine", help="timm scheduler name")
    warmup_epochs: int = option(0, lo=0)
    steps_per_epoch: int | None = option(None, lo=1, help="Default: usable samples // (batch × ranks).")
    clip_grad: float | None = option(1.0, lo=0, help="Gradient norm clip (0: off)")
    lam: float = option(1.0, flag="--lambda", lo=0, help="Weight of the explanation loss; 0 is plain KD")
    temperature: float = option(1.0, lo=0, exclusive_lo=True, help="KD temperature")
    ce_weight: float = option(0.0, lo=0, default_text="0", help="Cross-entropy on labels (−1 ignored)")
    expl_resolution: str = option("input", choices=EXPL_RESOLUTIONS, help="Where the explanation cosine is taken: "
                                  "'input' (both maps upsampled to the input size, as in the paper) or 'native' (the "
                                  "maps' own size)")
    crop_scale: tuple[float, float] = option((0.08, 1.0), help="Random-resized-crop area of a full cache")
    flip_p: float = option(0.0, lo=0, hi=1, default_text="0", help="Flip probability with a full cache")
    shots: int | None = option(None, lo=1, help="Use N images per class (few-shot).")
    shot_seed: int = option(0, help="Seed of the --shots draw")
    val_data: str | None = option(None, help="Validation shards: top-1 every epoch.")
    val_cache: str | None = option(None, help="Teacher cache of --val-data: agreement and explanation similarity.")
    workers: int = option(0, lo=0, help="DataLoader workers")
    local_cache: str | None = option(None, path="dir", help="Keep remote (s3://, …) cache and input shards in this "
                                     "local directory across epochs: each is downloaded once, verified by sha256 on "
                                     "every use (fetched again if it fails), least recently used evicted beyond "
                                     "--local-cache-gb. Ranks and workers of one machine share it; local paths are "
                                     "always read in place.")
    local_cache_gb: float = option(50.0, lo=0, exclusive_lo=True, help="Size bound of --local-cache in GB")
    decode_on_device: bool = option(False, help="Decode and render the images on the training device (nvjpeg on a "
                                    "GPU, one call per batch) instead of in the DataLoader workers, which then only "
                                    "read records: for GPU nodes whose CPU cores cannot decode as fast as the GPU "
                                    "trains. Images within one grey level of the workers' (a K-view cache is "
                                    "replayed nearly, not bit-, exactly).")
    amp: bool = option(False, help="bf16 autocast.")
    resume: bool = option(False, help="Continue from RUN_DIR/checkpoint.pt.")
    overwrite: bool = option(False, help="Replace an existing run in RUN_DIR (refused without it or --resume).")
    allow_missing: bool = option(False, help="Skip and count keys missing on one side.")
    seed: int = option(0)
    online_teacher: str | None = option(None, help="Live-teacher baseline (no --cache): teacher model name.")
    teacher_checkpoint: str | None = option(None, path="file", help="Weights of --online-teacher.")
    teacher_kwargs: dict[str, Any] = option(default_factory=dict, help="JSON kwargs of --online-teacher.")
    expect_cache_id: str | list[str] | None = option(None, multiple=True, help="Refuse any cache but the one with "
                                                     "this id (`e2kd inspect` prints it); once per --cache, in order.")
    checkpoint_every: int = option(0, help=_CHECKPOINT_EVERY, lo=0, default_text="0: at epoch ends only")
    trace_keys: str | None = option(None, help=_TRACE_KEYS, path="file")
    tensorboard: str | None = option(None, help=_TENSORBOARD, path="dir")
    partitions: int | None = option(None, help=_PARTITIONS, lo=1, default_text="the smallest such multiple ≥ 8")
    storage_options: dict[str, Any] | None = option(None, help=_STORAGE_OPTIONS, envvar="E2KD_STORAGE_OPTIONS",
                                                    repr=False)  # fsspec arguments: never recorded or printed
    progress: bool = option(True, cli=False)  # --quiet turns it off

    def __post_init__(self) -> None:
        from e2kd._config import check_crop_scale

        caches = [self.cache] if isinstance(self.cache, str) else list(self.cache or [])
        if (not caches) == (self.online_teacher is None):
            raise ValueError("give exactly one of --cache (train from a cache) or --online-teacher (live baseline)")
        if self.cache_weights and len(caches) < 2:
            raise ValueError("--cache-weights weighs several teachers: give one --cache per teacher")
        check_options(self)
        check_crop_scale(self.crop_scale)
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} must be fewer than --epochs {self.epochs}")
        if self.val_cache and not self.val_data:
            raise ValueError("--val-cache needs --val-data")


@dataclass(kw_only=True)
class CacheTeacherOptions:
    """Options of ``cache-teacher``: run a teacher once over a dataset and cache its logits and explanation maps."""

    ALIASES: ClassVar[dict[str, str]] = {}  #: former name → option (set below from the fields)

    data: str = option(help="Input: tar shards (paths/URLs, brace {000..009} and glob * ? [..] patterns, "
                       "comma-separated) or an image folder.")
    out: str = option(help="Store to write (local path or fsspec URL); re-running resumes it.")
    teacher: str = option(help="timm model name or bcos:<name>.")
    teacher_checkpoint: str | None = option(None, path="file", former=("--checkpoint",),
                                            help="Teacher weights (.safetensors or .pt/.pth).")
    random_teacher: bool = option(False, help="No checkpoint: a random-init teacher seeded by --seed, recorded in "
                                  "the manifest (tests, benchmarks).")
    num_classes: int = option(lo=1, help="Teacher's class count.")
    class_names: str | None = option(None, path="file", exists=True, help="Text file of class names, line i = "
                                     "class i (default for an image folder: its directories).")
    teacher_kwargs: dict[str, Any] = option(default_factory=dict, help='JSON kwargs for the model constructor, e.g. '
                                            '\'{"output_stride": 16}\'.')
    explainer: str = option("gradcam", help="gradcam | bcos | input_x_gradient (`e2kd explainers`)")
    explainers: str | None = option(None, help="Several explanation fields from one teacher, e.g. "
                                    "gradcam,input_x_gradient (bcos,gradcam for a B-cos teacher); each field is what "
                                    "a single-explainer cache would hold; the first is the default (students choose "
                                    "with --expl-field).")
    explainer_kwargs: dict[str, Any] = option(default_factory=dict, help="JSON kwargs of the explainer (recorded in "
                                              "the manifest).")
    views: str = option("full", help="'full' (one whole-image view; ❄ frozen e²KD) or K random-resized-crop views.")
    crop_scale: tuple[float, float] = option((0.08, 1.0), help="Area range of random crops")
    flip_p: float = option(0.5, lo=0, hi=1, help="Flip probability of random views (0 for digits/text)")
    input_size: int = option(224, lo=8, help="Teacher input side in pixels")
    batch_size: int = option(64, lo=1, help="Views per teacher batch")
    logits: str = option("full", help="How logits are stored: 'full' (float16), 'topk:K' (the K largest + the "
                         "log-sum-exp of all; a biased KD target) or 'sampled:S[@T]' (S class ids drawn from the "
                         "teacher at temperature T, default 1: an unbiased KD gradient; students train at T)")
    topk: int | None = option(None, hidden=True, help="Former spelling of --logits topk:K.")
    map_dtype: str = option("float16", choices=MAP_DTYPES)
    map_size: tuple[int, int] | None = option(None, text=True, help="Area-pool maps to H or HxW before storing.")
    map_codec: str | None = option(None, help="Codec of the explanation fields: a registered name (`e2kd codecs`) "
                                   "or JSON with its parameters (default: the one --map-dtype names).")
    format: str = option("zarr", choices=list_formats, dest="fmt", help="zarr (random access) or wds (a WebDataset "
                         "tar per shard, joinable by __key__)")
    actors: int | None = option(None, lo=1, former=("--workers",), default_text="one per CPU/GPU slot",
                                help="Ray actors, one teacher each")
    gpus_per_actor: float = option(0.0, lo=0, former=("--gpus-per-worker",), default_text="0",
                                   help="GPUs per actor")
    threads_per_actor: int = option(1, lo=1, former=("--threads-per-worker",),
                                    help="Torch threads per actor (fixed for determinism)")
    decode_workers: int = option(0, lo=0, help="Threads per actor that decode images and render views ahead of the "
                                 "teacher (0: in the actor's own thread; on a GPU node about cores per GPU − 2). The "
                                 "output is the same for any value; each actor asks Ray for threads-per-actor + "
                                 "decode-workers CPUs")
    precision: str = option("fp32", choices=PRECISIONS, help="Teacher autocast")
    ray_address: str | None = option(None, help="'auto' or HOST:PORT to join a running Ray cluster (default: private "
                                     "local).")
    overwrite: bool = option(False, help="Delete an existing e2kd store at --out and start over (never a directory "
                             "that is not one).")
    create_bucket: bool = option(False, help="Create --out's bucket if it does not exist (refused by default: a typo "
                                 "would make a new bucket).")
    seed: int = option(0, help="Seed of the random views")
    storage_options: dict[str, Any] | None = option(None, help=_STORAGE_OPTIONS, envvar="E2KD_STORAGE_OPTIONS",
                                                    repr=False)  # fsspec arguments: never recorded or printed
    progress: bool = option(True, cli=False)  # --quiet turns it off

    def __post_init__(self) -> None:
        from e2kd._config import check_crop_scale
        from e2kd.explain._registry import check_supports

        check_options(self)
        check_crop_scale(self.crop_scale)
        self.encoding  # noqa: B018 - top-k, map dtype and map size are checked here, before any work
        self.explanation_codec  # noqa: B018 - an unknown --map-codec is refused here
        self.view_policy  # noqa: B018
        if self.explainers:
            self.explainer = self.explainer_names[0]
        for i, name in enumerate(self.explainer_names):  # the explainer's answer, before any work (unknown: refused)
            check_supports(name, self.teacher, default=i == 0)
        if self.teacher_checkpoint is not None and self.random_teacher:
            raise ValueError("--teacher-checkpoint and --random-teacher exclude each other")

    @property
    def explanation_codec(self) -> Codec:
        """The codec of every explanation field: ``--map-codec`` (a registered name, or JSON with parameters), else
        the one ``--map-dtype`` names."""
        from e2kd.storage._codecs import get_codec

        if not self.map_codec:
            return self.encoding.map_codec
        text = str(self.map_codec).strip()
        spec = json.loads(text) if text.startswith("{") else {"name": text}
        codec = get_codec(spec)
        if codec.kind != "explanation":
            raise ValueError(f"--map-codec {codec.name!r} is a {codec.kind} codec, not an explanation codec")
        return codec

    @property
    def explainer_names(self) -> list[str]:
        """The explainers, one explanation field each (the first is the cache's default field)."""
        from e2kd.storage._fields import check_field_name

        if not self.explainers:
            return [self.explainer]
        names = [n.strip() for n in str(self.explainers).split(",") if n.strip()]
        if not names or len(set(names)) != len(names) or len(names) > 8:
            raise ValueError(f"--explainers must name 1 to 8 different explainers, got {self.explainers!r}")
        for name in names:
            check_field_name(name)
        return names

    @property
    def view_policy(self) -> ViewPolicy:
        from e2kd.pipeline._views import ViewPolicy

        return ViewPolicy.parse(self.views, scale=tuple(self.crop_scale), flip_p=self.flip_p, seed=self.seed)

    @property
    def encoding(self) -> Encoding:
        from e2kd.storage._encoding import parse_logits

        return Encoding(num_classes=self.num_classes, **parse_logits(self.logits, self.topk), map_dtype=self.map_dtype,
                        map_size=(self.map_size[0], self.map_size[1]) if self.map_size else None)


# ``ALIASES`` (former name → option), as the classes had them before their options were declared once
CacheTeacherOptions.ALIASES = former_names(CacheTeacherOptions)
TeacherOptions.ALIASES = former_names(TeacherOptions)
TrainOptions.ALIASES = former_names(TrainOptions)

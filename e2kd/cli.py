"""The ``e2kd`` command line: thin click commands, each calling one library function."""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import click

from e2kd import __version__
from e2kd._options import click_options, take_former
from e2kd.stages._options import CacheTeacherOptions, TeacherOptions, TrainOptions


def _fail(exc: BaseException) -> click.ClickException:
    """One line for the user: the message's first line (the last one, unwrapped, for a DataLoader worker's error)."""
    from e2kd.storage._options import credentials_message, is_credentials_error

    if is_credentials_error(exc):
        return click.ClickException(credentials_message(_command_urls()))
    text = str(exc)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return click.ClickException(type(exc).__name__)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: "pkg.module.Error: message" is last
        return click.ClickException(lines[-1].split(": ", 1)[-1])
    return click.ClickException(lines[0])


def _command_urls() -> list[str]:
    """The URLs the running command was given (its options and arguments; never a JSON value such as
    ``--storage-options``), to name them in an error."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    values = list(ctx.params.values()) or ctx.meta.get("e2kd.args", [])  # the group's: the raw arguments
    return [v for v in values if isinstance(v, str) and "://" in v and not v.lstrip().startswith("{")]


class _Cli(click.Group):
    """The command group: an error no command expected still ends in one ``Error:`` line, never a traceback
    (``E2KD_DEBUG=1`` shows it)."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta["e2kd.args"] = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click clears them on invoke
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence of the CLI
            if os.environ.get("E2KD_DEBUG"):
                raise
            from e2kd.storage._options import is_credentials_error

            message = _fail(exc).message
            if is_credentials_error(exc):
                raise click.ClickException(message) from None
            raise click.ClickException(f"{type(exc).__name__}: {message} (E2KD_DEBUG=1 shows the traceback)") \
                from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="e2kd")
def main() -> None:
    """e2kd: explanation-enhanced knowledge distillation with a cached teacher.

    \b
    1. make-dataset   build the embedded digits-shift dataset (WebDataset shards)
    2. train-teacher  (optional) train a teacher
    3. cache-teacher  run a teacher once (Ray-parallel) and store its logits + explanation maps
    4. inspect/verify look at and check a cache before training from it (copy hands it to another place)
    5. train-student  train a student from the cache (KD + λ·explanation loss), no teacher loaded
    6. evaluate/show  top-1, teacher agreement, explanation similarity; pictures of maps
    demo runs all of it on digits-shift.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    warnings.showwarning = _show_warning
    from e2kd._plugins import load_plugins

    try:
        load_plugins()  # E2KD_PLUGINS: codecs, explainers, formats from other packages
    except ImportError as exc:
        raise _fail(exc) from None


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """Warnings reach the terminal as one ``Warning:`` line (stderr), like errors, not as a source listing."""
    click.echo(f"Warning: {message}", err=True)


def _preempted(exc: BaseException) -> None:
    """SIGTERM stopped the run after a checkpoint: say how to resume, exit 143 (what a scheduler expects)."""
    click.echo(f"preempted: {exc}", err=True)
    raise click.exceptions.Exit(143)


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _former(flag: str, dest: str, **kwargs: Any) -> Any:
    """A flag's former name, hidden from --help, still accepted (scripts and configs keep working)."""
    return click.option(flag, f"former__{dest}", hidden=True, **kwargs)


_take_former = take_former


def _storage_option(command: Any) -> Any:
    """``--storage-options JSON`` (also ``E2KD_STORAGE_OPTIONS``): fsspec arguments for object-store URLs."""
    return click.option("--storage-options", envvar="E2KD_STORAGE_OPTIONS", show_envvar=True,
                        help='JSON fsspec arguments for s3:// (gs://, az://, …) URLs, e.g. \'{"endpoint_url": '
                             '"http://host:9000"}\' (default: the usual AWS_* variables and profiles). Never '
                             'recorded or printed.')(command)


def _use_storage(options: str | None, *urls: str | None) -> None:
    """Apply ``--storage-options`` to the object-store protocols of ``urls`` (this process)."""
    from e2kd.storage._options import apply_storage_options, parse_storage_options, resolve_storage_options

    apply_storage_options(resolve_storage_options(parse_storage_options(options), urls))


def _config_values(config: str | None) -> dict[str, Any]:
    """The option values a ``--config`` file gives (to tell an explicit value from a default)."""
    from e2kd._config import load_yaml

    return load_yaml(config) if config else {}


def _model_flags(run_dir: str | None, student: str | None, weights: str | None, student_kwargs: str | None,
                 num_classes: int | None, required: bool = True) -> dict[str, Any]:
    """``--run DIR`` or ``--student/--weights/--student-kwargs``: the model to load (flags must agree with a run)."""
    from e2kd._config import parse_json_kwargs
    from e2kd._runs import fill_from_run

    given = {"student": student, "weights": weights, "student_kwargs": parse_json_kwargs(student_kwargs),
             "num_classes": num_classes}
    model = fill_from_run(run_dir, given, {"student": "name", "weights": "weights", "student_kwargs": "kwargs",
                                           "num_classes": "num_classes"}, "--run")
    if required and (model["student"] is None or model["weights"] is None):
        raise ValueError("name the model: --run RUN_DIR, or --student and --student-checkpoint (with --student-kwargs)")
    return model


@main.group("config")
def config_group() -> None:
    """The YAML presets shipped inside the package (usable as --config NAME from any directory)."""


@config_group.command("list")
def config_list_cmd() -> None:
    """Names of the packaged presets."""
    from e2kd._config import list_presets

    click.echo("\n".join(list_presets()))


@config_group.command("show")
@click.argument("name")
def config_show_cmd(name: str) -> None:
    """Print a preset (copy it, edit it, pass the copy as --config FILE)."""
    from e2kd._config import preset_path

    try:
        click.echo(preset_path(name).read_text(), nl=False)
    except ValueError as exc:
        raise _fail(exc) from None


@main.command("codecs")
def codecs_cmd() -> None:
    """List the registered codecs (how logits and maps become a cache's columns) and their kinds."""
    from e2kd.storage import list_codecs
    from e2kd.storage._codecs import codec_class

    for name in list_codecs():
        click.echo(f"{name}\t(kind: {codec_class(name).kind})")


@main.command("explainers")
def explainers_cmd() -> None:
    """List the registered explanation methods and their families."""
    from e2kd.explain import explainer_family, list_explainers

    for name in list_explainers():
        click.echo(f"{name}\t(family: {explainer_family(name)})")


@main.command("make-dataset")
@click.argument("name", type=click.Choice(["digits-shift"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the shards.")
@click.option("--seed", default=0, show_default=True, help="Everything is deterministic given the seed.")
@click.option("--tie", default=1.0, show_default=True,
              help="Probability that the patch colour matches the label in train/val (0.95 is Waterbirds-like).")
@click.option("--image-size", default=64, show_default=True, help="Canvas side in pixels.")
@click.option("--shard-size", default=250, show_default=True, help="Samples per tar shard.")
def make_dataset_cmd(name: str, out: str, seed: int, tie: float, image_size: int, shard_size: int) -> None:
    """Write a dataset as WebDataset shards: teacher-train, train, val and test-ood splits."""
    from e2kd.pipeline._datasets import DATASETS

    try:
        written = DATASETS[name](out, seed=seed, tie=tie, image_size=image_size, shard_size=shard_size)
    except ValueError as exc:
        raise _fail(exc) from None
    for split, paths in written.items():
        pattern = f"{out}/{split}-{{000000..{len(paths) - 1:06d}}}.tar"
        click.echo(f"{split}: {len(paths)} shard(s)  {pattern}")


@main.command("cache-teacher")
@click_options(CacheTeacherOptions, after={"teacher": click.option(
    "--teacher-run", type=click.Path(exists=True, file_okay=False),
    help="A train-teacher output directory: teacher name, class count, kwargs and weights from its summary.json (flags "
         "given as well must agree).")})
@click.option("--config", help="YAML file of these options, or a packaged preset name (demo-digits, …).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cache_teacher_cmd(config: str | None, quiet: bool, **flags: Any) -> None:
    """Run a teacher once over a dataset and cache its logits and explanation maps (Ray-parallel, resumable)."""
    from e2kd._config import build_options, parse_json_kwargs, parse_size
    from e2kd._runs import fill_from_run, inherit_from_run
    from e2kd.stages._cache_teacher import run_cache_teacher
    from e2kd.storage._options import parse_storage_options

    try:
        flags = _take_former(flags, CacheTeacherOptions)
        flags["teacher_kwargs"] = parse_json_kwargs(flags["teacher_kwargs"])
        run = flags.pop("teacher_run")
        flags = fill_from_run(run, flags, {"teacher": "name", "num_classes": "num_classes", "teacher_kwargs": "kwargs",
                                           "teacher_checkpoint": "weights"}, "--teacher-run")
        given = {**_config_values(config), **{k: v for k, v in flags.items() if v is not None}}
        flags.update({k: v for k, v in inherit_from_run(run, given).items() if k not in given})  # e.g. input size
        flags["explainer_kwargs"] = parse_json_kwargs(flags["explainer_kwargs"])
        flags["map_size"] = parse_size(flags["map_size"])
        flags["storage_options"] = parse_storage_options(flags["storage_options"])
        flags["progress"] = False if quiet else None
        opts = build_options(CacheTeacherOptions, config, flags)
        summary = run_cache_teacher(opts)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        raise _fail(exc) from None
    click.echo(f"cached {summary['num_samples']} samples in {summary['shards']} shard(s) "
               f"({summary['shards_cached_now']} now, {summary['shards_already_complete']} already complete); "
               f"skipped {summary['skipped']} bad sample(s); {summary['bytes_per_sample_view']:.0f} B/sample/view; "
               f"{summary['samples_per_s']:.1f} samples/s (+{summary['startup_seconds']:.0f} s Ray/teacher start-up)")


@main.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
@click.option("--keys", "list_keys", is_flag=True, help="List every cached key, one per line (nothing else).")
@click.option("--errors", "list_errors", is_flag=True,
              help="List every skipped or relabelled sample as one JSON line (key, shard, reason; nothing else).")
@_storage_option
def inspect_cmd(store: str, as_json: bool, list_keys: bool, list_errors: bool, storage_options: str | None) -> None:
    """Summarise a cache: its id, teacher, explainer, input size, views, maps, completeness, counts, bytes per
    sample."""
    from e2kd.stages._inspect import summarise_store
    from e2kd.storage import open_store

    try:
        _use_storage(storage_options, store)
        if list_keys or list_errors:
            opened = open_store(store)
            lines = list(opened.keys()) if list_keys else [json.dumps(e, sort_keys=True) for e in opened.errors()]
            sys.stdout.write("".join(line + "\n" for line in lines))
            return
        info = summarise_store(store)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise _fail(exc) from None
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    click.echo(f"store       {store}  ({info['format']}, schema v{info['schema_version']}, "
               f"e2kd {info['e2kd_version']})")
    click.echo(f"cache id    {info['cache_id']}")
    if info["class_names"]:
        shown = ", ".join(info["class_names"][:10]) + (", …" if len(info["class_names"]) > 10 else "")
        click.echo(f"classes     {shown}")
    teacher = info["teacher"]
    weights = (f"random init (seed {teacher['random_init_seed']})" if "random_init_seed" in teacher
               else f"checkpoint sha256={teacher.get('checkpoint_sha256')}")
    click.echo(f"teacher     {teacher['name']}  classes={info['num_classes']}  {weights}")
    size = "×".join(map(str, info["preprocessing"]["input_size"]))
    click.echo(f"explainer   {info['explainer']['name']}  map {info['map_shape']} {info['encoding']['map_dtype']}  "
               f"input {size} px  views {info['views']['policy']} ×{info['num_views']}")
    click.echo("fields      " + "  ".join(f"{f['name']} ({f['kind']}, {f['codec']['name']}"
                                          + (f", {'×'.join(map(str, f['map_shape']))}" if f.get("map_shape") else "")
                                          + ")" for f in info["fields"]))
    click.echo("codecs      " + "  ".join(f"{part}: " + " ".join([codec["name"], *(f"{k}={v}" for k, v in codec.items()
                                                                          if k not in ("name", "num_classes"))])
                                          for part, codec in info["codecs"].items()))
    click.echo(f"samples     {info['num_samples']}  skipped {info['errors']}  bad labels {info['bad_labels']} "
               f"(cached as unlabelled)  shards {len(info['shards'])} ({info['complete_shards']} complete)")
    click.echo(f"size        {info['bytes']} B  ({info['bytes_per_sample_view']:.0f} B per sample per view)")


@main.command("verify")
@click.argument("store")
@_storage_option
def verify_cmd(store: str, storage_options: str | None) -> None:
    """Recompute every shard's checksum and check its contents (every chunk present, counts, targets, keys unique
    across shards); exit non-zero naming the bad shard(s)."""
    from e2kd.storage import open_store

    try:
        _use_storage(storage_options, store)
        problems = open_store(store).verify()
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    if problems:
        raise click.ClickException(f"{len(problems)} bad shard(s): " + "; ".join(problems))
    click.echo("ok: every shard matches its checksum")


@main.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--overwrite", is_flag=True, help="Replace a different cache at DST (never a directory that is not one).")
@click.option("--create-bucket", is_flag=True, help="Create DST's bucket if it does not exist (refused by default).")
@_storage_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def copy_cmd(src: str, dst: str, overwrite: bool, create_bucket: bool, storage_options: str | None,
             quiet: bool) -> None:
    """Copy a cache from SRC to DST (local paths or URLs: s3://, gs://, …), shard by shard.

    Each shard is checked against its checksum before and after the copy; the manifest is written last, byte for
    byte (a reader never sees a half-copied store; the copy has the same cache id). Re-running resumes: shards
    already verified at DST are skipped.
    """
    from e2kd._progress import progress
    from e2kd.storage import copy_store

    try:
        _use_storage(storage_options, src, dst)
        with progress(unit="shard", desc="copy", disable=quiet, dynamic_ncols=True) as bar:
            report = copy_store(src, dst, overwrite=overwrite, create_bucket=create_bucket,
                                on_shard=lambda name, nbytes: bar.update(1))
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        raise _fail(exc) from None
    click.echo(f"copied {len(report.copied)} shard(s) ({report.nbytes} B), {len(report.skipped)} already at {dst} "
               f"and verified; cache id {report.cache_id}")


@main.command("train-student")
@click_options(TrainOptions)
@click.option("--config", help="YAML file of these options, or a packaged preset name (demo-digits, …).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_student_cmd(config: str | None, quiet: bool, **flags: Any) -> None:
    """Train a student from cached teacher outputs (KD + λ·explanation loss); the teacher is never loaded."""
    from e2kd._config import build_options, parse_json_kwargs
    from e2kd._runs import fill_from_run
    from e2kd.stages._train_student import train_student
    from e2kd.storage._options import parse_storage_options
    from e2kd.training._loop import Preempted

    try:
        for name in ("cache", "expect_cache_id"):  # given once: a value; several times: a list (one per teacher)
            given = list(flags[name] or ())
            flags[name] = None if not given else given[0] if len(given) == 1 else given
        flags["student_kwargs"] = parse_json_kwargs(flags["student_kwargs"])
        flags["teacher_kwargs"] = parse_json_kwargs(flags["teacher_kwargs"])
        flags["storage_options"] = parse_storage_options(flags["storage_options"])
        if flags["student_init"] and os.path.isdir(flags["student_init"]):
            flags = fill_from_run(flags["student_init"], flags, {"student": "name", "student_kwargs": "kwargs",
                                                                 "student_init": "weights"}, "--student-init")
        flags["progress"] = False if quiet else None
        summary = train_student(build_options(TrainOptions, config, flags))
    except Preempted as exc:
        _preempted(exc)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        raise _fail(exc) from None
    final = ", ".join(f"{k}={v:.4g}" for k, v in summary["final"].items())
    if _is_rank_zero():  # under torchrun: one summary line for the run
        click.echo(f"trained {summary['steps']} steps on {summary['samples']} samples: {final}")


@main.command("evaluate")
@click.option("--data", required=True, help="Evaluation shards.")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="A train-student (or train-teacher) run directory: model, kwargs and weights from its summary.json.")
@click.option("--student", help="Student model name (or --run).")
@click.option("--student-checkpoint", "weights", type=click.Path(exists=True, dir_okay=False),
              help="The student's weights, e.g. RUN_DIR/student.safetensors (or --run).")
@_former("--weights", "weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--student-kwargs", help="JSON kwargs of the student constructor.")
@click.option("--cache", multiple=True,
              help="Teacher cache of --data: agreement and explanation similarity (for a K-view cache, against each "
                   "sample's first cached view, on that view's crop); once per teacher, as train-student's.")
@click.option("--num-classes", type=int, help="Needed without --cache or --run.")
@click.option("--input-size", type=int, help="Needed without --cache or --run (a run records its own).")
@click.option("--expl-field", help="The cache's explanation field expl_sim compares with (where it holds several).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--expl-resolution", type=click.Choice(["input", "native"]), default="input", show_default=True,
              help="Where expl_sim's cosine is taken (as train-student's --expl-resolution).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="DataLoader workers.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line on stdout.")
@click.option("--expect-cache-id", multiple=True,
              help="Refuse any cache but the one with this id (`e2kd inspect` prints it); once per --cache, in order.")
@_storage_option
def evaluate_cmd(data: str, run_dir: str | None, student: str | None, weights: str | None,
                 student_kwargs: str | None, cache: tuple[str, ...],
                 num_classes: int | None, input_size: int | None, batch_size: int, expl_resolution: str, workers: int,
                 as_json: bool, former__weights: str | None, expect_cache_id: tuple[str, ...],
                 storage_options: str | None, expl_field: str | None) -> None:
    """Top-1, agreement with the teacher and explanation similarity of a trained student."""
    weights = _take_former({"weights": weights, "former__weights": former__weights})["weights"]
    from e2kd.stages._evaluate import evaluate_against_caches, evaluate_weights
    from e2kd.storage import open_store

    caches, expect = list(cache), list(expect_cache_id)
    try:
        _use_storage(storage_options, data, *caches)
        model = _model_flags(run_dir, student, weights, student_kwargs, num_classes)
        student, weights, num_classes = model["student"], model["weights"], model["num_classes"]
        if run_dir and not caches:  # the input size the run trained at (a cache's own wins where one is given)
            from e2kd._runs import inherit_from_run

            input_size = inherit_from_run(run_dir, {"input_size": input_size}, "--run")["input_size"]
        common: dict[str, Any] = {"input_size": input_size, "batch_size": batch_size, "workers": workers,
                                  "expl_resolution": expl_resolution, "progress": True, "expl_field": expl_field}
        if len(caches) > 1:
            metrics: dict[str, Any] = evaluate_against_caches(data, student, weights, model["student_kwargs"], caches,
                                                              expect, num_classes=num_classes, **common)
        else:
            if len(expect) > 1:
                raise ValueError(f"--expect-cache-id is given {len(expect)} times for {len(caches)} cache(s)")
            metrics = evaluate_weights(data, student, weights, model["student_kwargs"], caches[0] if caches else None,
                                       num_classes, expect_cache_id=expect[0] if expect else None, **common)
        opened = open_store(caches[0]) if caches else None
        views = opened.manifest.num_views if opened else 1
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise _fail(exc) from None
    if views > 1:
        click.echo(f"note: {caches[0]} holds {views} views per sample; agreement and expl_sim compare on the first",
                   err=True)
    if opened is not None:
        metrics["cache_id"] = opened.cache_id
    if len(caches) > 1:
        metrics["cache_ids"] = [open_store(c).cache_id for c in caches]
    if as_json:
        sys.stdout.write(json.dumps(metrics) + "\n")
    else:
        click.echo("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


@main.command("train-teacher")
@click_options(TeacherOptions)
@click.option("--config", help="YAML file of these options, or a packaged preset name.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_teacher_cmd(config: str | None, quiet: bool, **flags: Any) -> None:
    """Train a teacher with plain supervised learning (the student's loop: timm optimiser and schedule, label
    smoothing, checkpoints, --resume)."""
    from e2kd._config import build_options, parse_json_kwargs
    from e2kd.stages._train_teacher import train_teacher
    from e2kd.training._loop import Preempted

    try:
        flags = _take_former(flags)
        flags["teacher_kwargs"] = parse_json_kwargs(flags["teacher_kwargs"])
        flags["progress"] = False if quiet else None
        summary = train_teacher(build_options(TeacherOptions, config, flags))
    except Preempted as exc:
        _preempted(exc)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        raise _fail(exc) from None
    click.echo(f"teacher: {', '.join(f'{k}={v:.4g}' for k, v in summary['final'].items())}")
    if summary.get("replaced_unreadable"):
        click.echo(f"skipped {summary['replaced_unreadable']} unreadable sample read(s) (each replaced in its batch by "
                   f"a readable sample of the same block; the warnings above name them)")


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Tiny budget (~2 min): checks the pipeline, not the accuracies.")
def demo_cmd(out: str, quick: bool) -> None:
    """digits-shift end to end: teacher, caches, KD vs ❄/K-view/live e²KD students, results table and figure."""
    from e2kd.stages._demo import run_demo

    try:
        run_demo(out, quick=quick)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        raise _fail(exc) from None
    click.echo(f"wrote {out}/results.md, {out}/results.json and {out}/explanations.png")


@main.command("show")
@click.argument("store")
@click.option("--key", required=True, help="Sample key.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Figure to write (.png, .svg, .pdf).")
@click.option("--data", help="Where the image is (default: the manifest's local input path).")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="A train-student run directory: its student's map beside the teacher's.")
@click.option("--student", help="Student model name, to show its map beside the teacher's.")
@click.option("--student-checkpoint", "weights", type=click.Path(exists=True, dir_okay=False),
              help="The student's weights (or --run).")
@_former("--weights", "weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--student-kwargs", help="JSON kwargs of the student constructor.")
@click.option("--cache", "more_caches", multiple=True,
              help="A further teacher's cache of the same inputs (once per teacher, as train-student's --cache): "
                   "its map beside STORE's.")
@click.option("--shared-scale", is_flag=True,
              help="One colour scale for a view's teacher and student maps (else each map its own, so a nearly "
                   "flat map looks as peaked as any).")
@_storage_option
def show_cmd(store: str, key: str, out: str, data: str | None, run_dir: str | None, student: str | None,
             weights: str | None, student_kwargs: str | None, former__weights: str | None,
             storage_options: str | None, more_caches: tuple[str, ...], shared_scale: bool) -> None:
    """Image, view boxes and the teacher map per view (and the student's), as heat maps."""
    weights = _take_former({"weights": weights, "former__weights": former__weights})["weights"]
    from e2kd.stages._figures import show_key

    try:
        _use_storage(storage_options, store, data, *more_caches)
        model = _model_flags(run_dir, student, weights, student_kwargs, None, required=False)
        cosines = show_key(store, key, out, data, model["student"], model["weights"], model["student_kwargs"],
                           more_caches=list(more_caches), shared_scale=shared_scale)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise _fail(exc) from None
    if cosines:
        click.echo("student-teacher map cosine per view: " + "  ".join(f"{v}: {c:.3f}" for v, c in enumerate(cosines)))
    click.echo(f"wrote {out}")


@main.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Figure to write (.png, .svg or .pdf).")
def plot_cmd(runs: tuple[str, ...], out: str) -> None:
    """Training curves of train-student / train-teacher runs (their metrics.jsonl), overlaid: the loss and its
    parts, the learning rate and the validation metrics per epoch; the legend names each run by its directory."""
    from e2kd.stages._curves import plot_runs

    try:
        curves = plot_runs(list(runs), out)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    drawn = sum(len(lines) for lines in curves.values())
    click.echo(f"wrote {out}: {drawn} curves of {len(runs)} run(s)")


def reference_markdown() -> str:
    """Every command's ``--help`` as Markdown: the documentation's CLI reference, ``docs/cli.md`` (a test keeps the
    page equal to it)."""
    root = click.Context(main, info_name="e2kd", **{**main.context_settings, "terminal_width": 110})
    contexts = [root]
    for name, command in sorted(main.commands.items()):
        if command.hidden:
            continue
        ctx = click.Context(command, info_name=name, parent=root)
        if isinstance(command, click.Group):
            contexts += [click.Context(c, info_name=sub, parent=ctx) for sub, c in sorted(command.commands.items())]
        else:
            contexts.append(ctx)
    out = ["Generated from `--help` (`e2kd cli-reference` prints it; a test keeps this page equal to it).", ""]
    for ctx in contexts:
        out += [f"## `{ctx.command_path}`", "", "```text", ctx.command.get_help(ctx), "```", ""]
    return "\n".join(out)


@main.command("cli-reference", hidden=True)
def cli_reference_cmd() -> None:
    """Print the CLI reference page's generated part (Markdown, docs/cli.md)."""
    click.echo(reference_markdown(), nl=False)


if __name__ == "__main__":
    main()

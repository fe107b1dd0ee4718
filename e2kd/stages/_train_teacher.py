"""``e2kd train-teacher``: plain supervised training of a teacher — the student's loop with a CE objective."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from e2kd.models import create_model, model_spec
from e2kd.pipeline._loader import StreamSpec, plan_join
from e2kd.pipeline._sources import class_names, list_shards
from e2kd.pipeline._train_stream import build_train_loader
from e2kd.stages._options import TeacherOptions
from e2kd.training import SupervisedObjective, Trainer, build_optimizer, check_run_dir, evaluate_model
from e2kd.training._loop import order_record, seed_everything, training_order

__all__ = ["TeacherOptions", "train_teacher"]


def train_teacher(opts: TeacherOptions) -> dict[str, Any]:
    """Train on labelled shards; write ``OUT/teacher.safetensors``, ``metrics.jsonl`` and ``summary.json``.

    The same :class:`~e2kd.training.Trainer` as students (checkpoint every epoch; ``resume`` continues one).
    """
    check_run_dir(Path(opts.out), opts.resume, opts.overwrite)
    shards = list_shards(opts.data)
    plan = plan_join(shards, None)
    keys = {k: v for k, v in plan.keys.items() if v is not None and v >= 0}
    if not keys:
        raise ValueError(f"no labelled samples in --data ({len(plan.keys)} sample(s), none with a class label: a "
                         f"teacher trains on WebDataset samples with a 'cls' member, or an image folder's classes)")
    if len(keys) < opts.batch_size:
        raise ValueError(f"{len(keys)} labelled samples are fewer than one batch of {opts.batch_size}; lower "
                         f"--batch-size")
    order = training_order(plan.keys_by_shard(keys), opts.seed, opts.batch_size, 1, opts.workers, opts.partitions,
                           Path(opts.out) if opts.resume else None)
    steps = order.steps_per_pass
    seed_everything(opts.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(opts.teacher, opts.num_classes, **opts.teacher_kwargs).to(device).train()
    optimizer, scheduler = build_optimizer(model, opt=opts.opt, lr=opts.lr, weight_decay=opts.weight_decay,
                                           sched=opts.sched, epochs=opts.epochs, warmup_epochs=opts.warmup_epochs,
                                           steps_per_epoch=steps)
    spec = StreamSpec(shards=shards, keys=set(keys), input_size=(opts.input_size,) * 2,
                      crop_scale=(opts.crop_scale[0], opts.crop_scale[1]), flip_p=opts.flip_p, seed=opts.seed)
    stream, loader = build_train_loader(spec, order, steps, opts.workers)
    val_data = opts.val_data
    validate = (lambda: evaluate_model(model, val_data, None, None, opts.input_size, opts.batch_size)) \
        if val_data else None
    trainer = Trainer(model, SupervisedObjective(model, opts.label_smoothing), optimizer, scheduler, stream, loader,
                      steps, opts.epochs, device, progress=opts.progress, desc="teacher epoch", validate=validate,
                      options=json.loads(json.dumps(asdict(opts))), order=order_record(order),
                      checkpoint_every=opts.checkpoint_every,
                      trace_keys=Path(opts.trace_keys) if opts.trace_keys else None,
                      tensorboard=Path(opts.tensorboard) if opts.tensorboard else None)
    out = Path(opts.out)
    metrics, _ = trainer.fit(out, resume=opts.resume)
    trainer.save_weights(out / "teacher.safetensors")
    summary = {"teacher": model_spec(model), "class_names": class_names(shards), "final": metrics,
               "replaced_unreadable": stream.stand_ins, "options": json.loads(json.dumps(asdict(opts)))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

"""Evaluating a model on a source: top-1, agreement with a cached teacher's top-1, explanation similarity."""

from __future__ import annotations

import torch

from e2kd.losses import E2KDObjective
from e2kd.models import input_transform
from e2kd.pipeline._loader import StreamSpec, build_loader, plan_join, teacher_maps
from e2kd.pipeline._sources import list_shards
from e2kd.storage import open_store

__all__ = ["evaluate_model"]


def evaluate_model(model: torch.nn.Module, data: str, cache: str | None, explainer: str | None, input_size: int,
                   batch_size: int = 64, workers: int = 0, expl_resolution: str = "input",
                   progress: bool = False, expl_field: str | None = None) -> dict[str, float]:
    """Metrics of a student on ``data`` (whole images, or the cache's first view for a K-view cache).

    Returns ``top1`` when samples carry labels, and with a cache ``agreement`` (student top-1 = teacher top-1)
    and ``expl_sim`` (mean cosine of the student's map to the cached teacher map, for the teacher's class,
    taken as :class:`~e2kd.losses.E2KDObjective` takes it at ``expl_resolution``; the cache's explanation field
    ``expl_field``, None: its default).
    ``eval_samples`` is the number of samples evaluated. Metrics that cannot be computed are absent, never NaN.
    """
    store = open_store(cache) if cache else None
    shards = list_shards(data)
    plan = plan_join(shards, store, labels=False)
    spec = StreamSpec(shards=shards, keys=set(plan.keys), input_size=(input_size, input_size),
                      cache_uri=cache, random_crop=False, shuffle_buffer=1, trusted=frozenset(plan.trusted),
                      cache_shards=(tuple(store.shard_names),) if store is not None else None,
                      expl_field=expl_field)
    _, loader = build_loader(spec, batch_size, workers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    objective = E2KDObjective(model, explainer, expl_resolution=expl_resolution) \
        if (store is not None and explainer) else None
    sums = {"correct": 0, "labelled": 0, "agree": 0, "sim": 0.0, "cached": 0, "n": 0}
    transform = input_transform(model)
    from e2kd._progress import progress as progress_bar

    # labels of −1 (unlabelled) are masked out of top-1, so timm.utils.accuracy (no mask) is not used here
    for batch in progress_bar(loader, desc="evaluate", unit="batch", leave=False, disable=not progress):
        x = transform(batch["image"].to(device))
        if "t_logits" in batch and objective is not None:
            targets = batch["target"].to(device)
            objective(x, batch["t_logits"].to(device).float(), teacher_maps(batch, device), targets=targets,
                      create_graph=False)
            logits, similarity = objective.last_logits, objective.last_similarity
            if logits is None or similarity is None:
                raise RuntimeError("the objective kept no logits or explanation similarity for the batch")
            sums["agree"] += int((logits.argmax(1) == targets).sum())
            sums["sim"] += float(similarity.sum())
            sums["cached"] += len(targets)
        else:
            with torch.no_grad():
                logits = model(x)
        labels = batch["label"].to(device)
        mask = labels >= 0
        sums["correct"] += int((logits.argmax(1)[mask] == labels[mask]).sum())
        sums["labelled"] += int(mask.sum())
        sums["n"] += len(labels)
    model.train(was_training)
    out: dict[str, float] = {"eval_samples": sums["n"]}
    if sums["labelled"]:
        out["top1"] = sums["correct"] / sums["labelled"]
    if sums["cached"]:
        out["agreement"] = sums["agree"] / sums["cached"]
        out["expl_sim"] = sums["sim"] / sums["cached"]
    return out

"""Refit the scene head on the frozen encoder with every train image of the class-labelled sets.

Stage 0 learns the scene head together with the encoder's top blocks, on a capped share of the sets (EuroSAT:
3,000 of its 12,000 train images) and on cached augmented maps. After stage 2 the encoder is frozen for good, so
the head (a linear layer over the mean visual token) can be refitted cheaply on every train image: the mean
token of each image and of other dihedral views of it is computed once, then the head is fitted from its
current weights (AdamW, the sets weighted equally). The refit is kept only when the mean over the sets of the
single-view val accuracy (the argmax among each set's own classes, as ``rsmoe evaluate`` scores it) improves.

**Anchors.** Fitted on the sets alone, the head grows confident on what the sets do not show: on the README's
Sentinel-2 example (256 px tiles of 2.56 km, a patchwork of fields, forest, a village and a river) a refit of
v22 named every tile farmland or permanent cropland at 0.40-0.75 where v22 is unsure (0.08-0.16), and the
captions lost the forest and the river. With the EuroSAT mosaics of the recipe (:mod:`training.data.mosaics`:
256 px patchworks at 10 m, that scale) as **anchors**, whose targets are the head's own probabilities before the
refit, the head learns the sets' images better and keeps its answers on wide mixed tiles (``anchor_weight``:
the anchors' total weight against one set's; 0 leaves the mosaics out). Learning the mosaics' cell shares as
targets instead was worse: the village tile became "highway" at 0.79.

Run by ``rsmoe train`` after stage 2, and by ``rsmoe train --answer-head-of DIR`` before the answer head, when
the recipe says ``scene_head_refit: {enabled: true}``; its report (``scene_head_refit.json`` in the model
directory) marks it done. The answer head takes the scene probabilities as input, so a refit drops it and the
recipe's answer head step learns it again.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from engine.model import RSMoEModel
from engine.model.image_processing import DIHEDRAL_VIEWS, dihedral
from engine.model.routing import MoEInference
from training.config import SceneHeadRefit
from training.data.mosaics import MOSAIC_SET
from training.data.records import CaptionRecord
from training.data.sets import CAPTION_SETS, load_mixture, scene_index
from training.evaluate import class_map

log = logging.getLogger(__name__)

REPORT_FILE = "scene_head_refit.json"
ANCHORS = "anchors"  # the anchor images' group in the fit


def per_view(model: MoEInference, records: Sequence[CaptionRecord], views: Callable[[], Sequence[int]],
             reduce: Callable[[Any], Any], batch_size: int, desc: str) -> np.ndarray:
    """``reduce`` of the visual tokens of each image under each dihedral view ``views()`` draws for its batch,
    stacked (N, views, ...)."""
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        pixels = model.preprocess([r.image_path for r in records[start:start + batch_size]])
        rows.append(np.stack([np.asarray(reduce(model.encode_images(dihedral(pixels, v, axes=(2, 3)))),
                                         dtype=np.float32) for v in views()], axis=1))
    return np.concatenate(rows)


def mean_tokens(model: MoEInference, records: Sequence[CaptionRecord], views: int, seed: int,
                batch_size: int = 64) -> np.ndarray:
    """The mean visual token (N, views, D) of each image as it is and, for ``views`` > 1, under ``views - 1``
    other dihedral views drawn at random (the same for a batch)."""
    rng = np.random.default_rng(seed)

    def drawn() -> list[int]:
        return [0, *rng.choice(np.arange(1, DIHEDRAL_VIEWS), size=views - 1, replace=False).tolist()]

    return per_view(model, records, drawn, lambda tokens: np.asarray(tokens, dtype=np.float32).mean(axis=1),
                    batch_size, "scene head features")


def fit_scene_head(features: np.ndarray, targets: np.ndarray, groups: Sequence[str], weight: torch.Tensor,
                   bias: torch.Tensor, options: SceneHeadRefit, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a linear head (classes, D) on ``features`` (N, views, D) from ``weight`` / ``bias`` towards
    ``targets`` (N, classes: one-hot labels, or an anchor's probabilities) by cross-entropy; every view is a
    sample, and each group (a set, or :data:`ANCHORS`) carries the same total weight whatever its size, the anchors
    ``options.anchor_weight`` times that."""
    generator = torch.Generator().manual_seed(seed)
    views = features.shape[1]
    x = torch.from_numpy(features.reshape(-1, features.shape[-1]))
    y = torch.from_numpy(np.repeat(np.asarray(targets, np.float32), views, axis=0))
    group_names = np.repeat(np.asarray(groups), views)
    sample_weight = np.zeros(len(group_names), np.float32)
    for name in set(group_names.tolist()):
        mask = group_names == name
        sample_weight[mask] = (options.anchor_weight if name == ANCHORS else 1.0) / mask.sum()
    w = torch.from_numpy(sample_weight * len(sample_weight) / sample_weight.sum())
    head = nn.Linear(x.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())
    optimiser = torch.optim.AdamW(head.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    for _ in range(options.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), options.batch_size):
            idx = order[start:start + options.batch_size]
            loss = -(y[idx] * torch.log_softmax(head(x[idx]), dim=-1)).sum(-1)
            loss = (loss * w[idx]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return head.weight.detach().clone(), head.bias.detach().clone()


def set_accuracies(logits: np.ndarray, records: Sequence[CaptionRecord], scenes: Sequence[str]) -> dict[str, float]:
    """Per set: the share of images whose best class among the set's own classes is theirs."""
    out = {}
    names = np.asarray([r.dataset for r in records])
    for name in sorted(set(names.tolist())):
        rows = np.flatnonzero(names == name)
        mapping = class_map(sorted({str(records[i].class_name) for i in rows}), scenes)
        chosen = logits[rows][:, mapping.columns].argmax(axis=-1)
        truth = np.asarray([mapping.names.index(str(records[i].class_name)) for i in rows])
        out[name] = round(float((chosen == truth).mean()), 4)
    return out


def refit_scene_head(model_dir: Path, roots: dict[str, str | None], options: SceneHeadRefit, seed: int,
                     dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Refit ``model_dir``'s scene head in place (kept only if val improves; the directory is then rewritten with
    what the model saves, so a caller keeps its own files); returns and writes the report."""
    from engine.runtime import load_model

    model_dir = Path(model_dir)
    roots = {name: roots.get(name) for name in CAPTION_SETS if roots.get(name)}
    model = RSMoEModel.from_pretrained(model_dir)
    if model.scene_head is None:
        raise ValueError(f"{model_dir} has no scene head (vision.scene_classes)")
    encoder = load_model(model_dir, backend="auto", device="cpu")  # ONNX when exported: the same tokens, faster
    scenes = model.config.vision.scene_classes
    train = [r for r in load_mixture(roots, "train", options.max_train_per_set).captions if r.class_name]
    val = [r for r in load_mixture(roots, "val", options.max_val_per_set).captions
           if r.class_name and r.dataset != MOSAIC_SET]
    anchors = [r for r in train if r.dataset == MOSAIC_SET] if options.anchor_weight > 0 else []
    train = [r for r in train if r.dataset != MOSAIC_SET]
    log.info("scene head refit: %d train images (%s), %d anchors, %d val", len(train),
             ", ".join(f"{k} {v}" for k, v in sorted(_counts(train).items())), len(anchors), len(val))
    weight, bias = model.scene_head.weight.detach().float(), model.scene_head.bias.detach().float()
    train_x = mean_tokens(encoder, train + anchors, options.views_per_image, seed)
    val_x = mean_tokens(encoder, val, 1, seed)[:, 0]
    targets = np.eye(len(scenes), dtype=np.float32)[scene_index(train, scenes)]
    if anchors:  # the head's own probabilities on view 0, before the refit
        anchor_logits = torch.from_numpy(train_x[len(train):, 0]) @ weight.T + bias
        targets = np.concatenate([targets, torch.softmax(anchor_logits, dim=-1).numpy()])
    before = set_accuracies(val_x @ weight.numpy().T + bias.numpy(), val, scenes)
    new_weight, new_bias = fit_scene_head(train_x, targets, [r.dataset for r in train] + [ANCHORS] * len(anchors),
                                          weight, bias, options, seed)
    after = set_accuracies(val_x @ new_weight.numpy().T + new_bias.numpy(), val, scenes)
    kept = float(np.mean(list(after.values()))) > float(np.mean(list(before.values())))
    report = {"kept": kept, "val_single_view_before": before, "val_single_view_after": after,
              "train_images": _counts(train), "anchor_images": len(anchors), "val_images": _counts(val),
              "options": options.__dict__}
    log.info("scene head refit %s: val single view %s -> %s", "kept" if kept else "dropped", before, after)
    if kept:
        with torch.no_grad():
            model.scene_head.weight.copy_(new_weight.to(model.scene_head.weight.dtype))
            model.scene_head.bias.copy_(new_bias.to(model.scene_head.bias.dtype))
        model.answer_head, model.config.answer_head.enabled = None, False  # its inputs changed: learnt again
        model.save_pretrained(model_dir, dtype=dtype)  # a fresh directory: only what the model saves
    (model_dir / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _counts(records: Sequence[CaptionRecord]) -> dict[str, int]:
    """Images per set."""
    return dict(Counter(r.dataset for r in records))

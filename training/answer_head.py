"""Train the answer head (:mod:`engine.model.answer_head`) of a trained model on its closed questions.

The last step of a recipe with ``answer_head.enabled``: the model's stages are done and frozen; the head learns
from the train questions whose answer is closed (RSVQA's presence / comparison / count / area / rural-urban,
the UCM-derived presence / count / rural-urban), each image seen as at inference (no augmentation). Counts and
areas are learnt as RSVQA's buckets. Small and quick (a few minutes on 2 cores): the features are computed once,
then a two-layer classifier is fitted on them.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from engine.errors import UserInputError
from engine.model.answer_head import KIND_LABELS, LABELS, AnswerHead, bag_of_words, head_features, question_tokens
from engine.model.modeling import RSMoEModel
from training.config import AnswerHeadTraining
from training.data.records import VQARecord
from training.metrics import normalize_rsvqa_answer, rsvqa_answers_match, rsvqa_bucket
from training.region_classifier import REGION_TILE_M

log = logging.getLogger(__name__)

#: The closed kind of each record type (RSVQA's and the UCM-derived set's); other types are open questions.
TYPE_KINDS: dict[str, str] = {"presence": "yes_no", "comp": "yes_no", "rural_urban": "rural_urban",
                              "count": "count", "area": "area"}


def record_label(record: VQARecord) -> tuple[str, int] | None:
    """A closed question's kind and label index, or None for an open question (e.g. the scene)."""
    kind = TYPE_KINDS.get(str(record.question_type))
    if kind is None:
        return None
    answer = normalize_rsvqa_answer(record.answer, record.question_type)
    if kind in ("count", "area"):
        return kind, LABELS.index(f"{kind}:{rsvqa_bucket(float(answer.removesuffix('m2')))}")
    return kind, LABELS.index(answer)


def closed_records(records: Sequence[VQARecord]) -> list[VQARecord]:
    return [r for r in records if record_label(r) is not None]


def vocabulary(records: Sequence[VQARecord], min_count: int) -> list[str]:
    """The question tokens seen in at least ``min_count`` questions, sorted."""
    counts = Counter(t for r in records for t in set(question_tokens(r.question)))
    return sorted(t for t, n in counts.items() if n >= min_count)


@torch.no_grad()
def model_inputs(model: RSMoEModel, records: Sequence[VQARecord], batch_size: int = 32,
                 region_tile_m: float | None = None) -> np.ndarray:
    """:meth:`answer_head_inputs` of every record, each image encoded once as at inference; with
    ``region_tile_m``, also each image's region's scene probabilities over tiles of that size (as ``rsmoe ask``
    computes them: :meth:`engine.pipeline.Pipeline.region_mean_probabilities`)."""
    from engine.inputs import ImageInput
    from engine.pipeline import Pipeline

    first = {str(r.image_path): r for r in reversed(records)}
    images = sorted(first)
    row_of = {path: i for i, path in enumerate(images)}
    visual = torch.cat([model.encode_images(model.preprocess(images[i:i + batch_size]))
                        for i in range(0, len(images), batch_size)])
    regions = None
    if region_tile_m is not None:
        pipeline = Pipeline(model, batch_size=batch_size)
        means = [pipeline.region_mean_probabilities(
            ImageInput(path=path, ground_resolution_m=first[path].ground_resolution_m), region_tile_m)
            for path in images]
        log.info("answer head: %d of %d images span two or more region tiles", sum(m is not None for m in means),
                 len(means))
        regions = model.region_probabilities(visual, means)
    rows = []
    for i in range(0, len(records), 128):
        index = [row_of[str(r.image_path)] for r in records[i:i + 128]]
        rows.append(model.answer_head_inputs(visual[index], [r.question for r in records[i:i + 128]],
                                             None if regions is None else regions[index]))
    return np.concatenate(rows)


def fit_answer_head(words_vocabulary: Sequence[str], features: np.ndarray, records: Sequence[VQARecord],
                    settings: AnswerHeadTraining, seed: int) -> AnswerHead:
    """Fit the classifier on prepared features (:func:`head_features` rows of ``records``)."""
    labels = [record_label(r) for r in records]
    mask = np.full((len(records), len(LABELS)), -1e9, dtype=np.float32)
    for row, (kind, _) in enumerate(labels):  # type: ignore[misc]
        mask[row, [LABELS.index(label) for label in KIND_LABELS[kind]]] = 0.0
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    x = torch.from_numpy((features - mean) / std)
    y = torch.tensor([label for _, label in labels])  # type: ignore[misc]
    m = torch.from_numpy(mask)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Dropout(settings.dropout), nn.Linear(x.shape[1], settings.hidden),
                        nn.GELU(approximate="tanh"), nn.Dropout(settings.dropout), nn.Linear(settings.hidden, len(LABELS)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    net.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            loss = nn.functional.cross_entropy(net(x[batch]) + m[batch], y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        if epoch % 20 == 0 or epoch == settings.epochs - 1:
            log.info("answer head epoch %d/%d: loss %.4f", epoch + 1, settings.epochs, total / len(x))
    first, second = net[1], net[4]
    tensors: dict[str, Any] = {"mean": mean, "std": std,
                               "w1": first.weight.detach().numpy(), "b1": first.bias.detach().numpy(),
                               "w2": second.weight.detach().numpy(), "b2": second.bias.detach().numpy()}
    return AnswerHead(words_vocabulary, tensors)


def train_answer_head(model: RSMoEModel, train: Sequence[VQARecord], settings: AnswerHeadTraining,
                      seed: int) -> AnswerHead:
    """The answer head for ``model`` from its closed train questions (it is attached to the model too); with
    ``settings.region_inputs`` it also sees each image's region over tiles of :data:`REGION_TILE_M`."""
    records = closed_records(train)
    if not records:
        raise ValueError("no closed train questions (presence, comparison, count, area, rural/urban) to learn from")
    log.info("answer head: %d closed train questions (%s)", len(records),
             dict(Counter(f"{r.dataset}:{r.question_type}" for r in records)))
    words = vocabulary(records, settings.min_token_count)
    index = {t: i for i, t in enumerate(words)}
    if settings.region_inputs and not model.config.vision.scene_classes:
        raise UserInputError("answer_head.region_inputs needs a model with a scene head (vision.scene_classes)")
    tile_m = REGION_TILE_M if settings.region_inputs else None
    features = head_features(bag_of_words([r.question for r in records], index),
                             model_inputs(model, records, region_tile_m=tile_m))
    head = fit_answer_head(words, features, records, settings, seed)
    if tile_m is not None:
        head = AnswerHead(head.vocabulary, head.tensors, tile_m, region_inputs=True)
    model.answer_head = head
    model.config.answer_head.enabled = True
    return head


def head_accuracy(model: RSMoEModel, records: Sequence[VQARecord]) -> dict[str, float]:
    """The share of closed questions the model's answer head answers right, per set (counts and areas by
    bucket), through :meth:`head_answers` with each image seen alone (a head with region inputs gets the
    image's own scene probabilities: ``rsmoe evaluate`` scores it as the product runs it)."""
    assert model.answer_head is not None
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    with torch.no_grad():
        for i in range(0, len(records), 64):
            chunk = records[i:i + 64]
            visual = model.encode_images(model.preprocess([str(r.image_path) for r in chunk]))
            answers = model.head_answers(visual, [r.question for r in chunk], [record_label(r)[0] for r in chunk])
            for record, answer in zip(chunk, answers):
                total[record.dataset] += 1
                right[record.dataset] += rsvqa_answers_match(answer.text, record.answer, record.question_type)
    return {name: round(right[name] / total[name], 4) for name in total}


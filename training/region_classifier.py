"""Fit the answer head's region classifier: rural / urban from the built-up share of a region's tiles.

RSVQA-LR calls a 2.5 km Sentinel-2 tile urban when it holds more than about 500 buildings (its train tiles with a
building count: rural up to 489, urban from 570). The answer head, looking at the tile once at 11 m per pixel,
learnt its 64 train tiles by heart and was right for 11 of 16 val tiles. Cut into tiles of EuroSAT's size
instead, the scene head tells built-up land from farmland: the region's built-up share is the mean over its
tiles of the probability of a built-up scene (:data:`BUILT_UP_SCENES`;
:func:`engine.model.answer_head.built_up_share`), and a logistic regression on its log answers
rural / urban (:meth:`engine.model.answer_head.AnswerHead.region_answer`), run by
:meth:`engine.pipeline.Pipeline.ask` as the product runs it. One input, so one threshold: a regression over
every scene's mean log probability was as good on val (14 of 16) but called the README's rural Virginia scene
urban at 0.77; the share calls it urban at 0.56, which the product marks unsure. The threshold is RSVQA's
(Dutch building density): a region where more than about 8% of the land looks built up reads as urban.

``python -m training.region_classifier --model DIR --rsvqa-lr ../shared/data/rsvqa_lr [--out OUT.json]`` fits it
on the train split's rural / urban questions, writes it into the model's ``answer_head.safetensors``, and
reports the train and val accuracy; a recipe with ``answer_head.enabled`` fits it after the answer head.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from engine.errors import UserInputError
from engine.model.answer_head import ANSWER_HEAD_FILE, SHARE_FLOOR, AnswerHead, built_up_share, region_feature
from training.data.records import VQARecord
from training.metrics import normalize_rsvqa_answer
from training.report_tool import run_report_tool

log = logging.getLogger(__name__)

#: Region tiles of 640 m a side: EuroSAT's patch (64 px at 10 m), the scale whose land covers the scene head
#: knows best (RSVQA-LR's 2.5 km tiles are cut 4 x 4).
REGION_TILE_M = 640.0
#: The scenes whose land is built up (residential, commercial, industrial); roads, parks and sports grounds are
#: not counted (they lie in the countryside too).
BUILT_UP_SCENES = ("built-up area", "city center", "commercial area", "dense residential area",
                   "medium residential area", "residential area", "sparse residential area", "industrial area")
#: The L2 penalty's inverse strength (as scikit-learn's ``C``): leave-one-out on RSVQA-LR's 64 train tiles gave
#: 0.84 with 0.1 and 0.86 with 1; 0.1 keeps answers near the threshold unsure.
REGION_C = 0.1


def region_rows(pipeline: Any, records: Sequence[VQARecord]) -> tuple[np.ndarray, np.ndarray]:
    """The built-up shares (N,) and labels (1: urban) of the rural / urban questions whose image spans two or
    more region tiles (:meth:`engine.pipeline.Pipeline.region_scene_probabilities`); one row per image."""
    from engine.inputs import ImageInput

    scenes = pipeline.model.config.vision.scene_classes
    seen: set[str] = set()
    shares, labels = [], []
    for record in records:
        if record.question_type != "rural_urban" or str(record.image_path) in seen:
            continue
        seen.add(str(record.image_path))
        probabilities = pipeline.region_scene_probabilities(
            ImageInput(path=str(record.image_path), ground_resolution_m=record.ground_resolution_m), REGION_TILE_M)
        if probabilities is not None:
            shares.append(built_up_share(probabilities, scenes, BUILT_UP_SCENES))
            labels.append(float(normalize_rsvqa_answer(record.answer, "rural_urban") == "urban"))
    return np.asarray(shares, np.float32), np.asarray(labels, np.float32)


def fit_logistic(features: np.ndarray, labels: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression on ``features`` (N, F) (scikit-learn's objective: the summed log-loss
    plus |w|^2 / 2C, the bias unpenalised), fitted with L-BFGS; returns the weights (F,) and the bias."""
    x = torch.from_numpy(features.astype(np.float64))
    y = torch.from_numpy(labels.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum")
                + (w * w).sum() / (2.0 * c))
        loss.backward()
        return loss

    optimizer.step(objective)
    return w.detach().numpy().astype(np.float32), float(b.detach())


def add_region_classifier(model_dir: Path, head: AnswerHead, train: Sequence[VQARecord]) -> AnswerHead:
    """``head`` with a region classifier fitted on ``train``'s rural / urban questions about regions of two or
    more region tiles, run as the product runs ``model_dir`` (``head`` unchanged where there are fewer than 2
    of each answer)."""
    from engine.pipeline import Pipeline
    from engine.runtime import load_model

    shares, labels = region_rows(Pipeline(load_model(model_dir, backend="auto", device="cpu")), train)
    return with_fitted_classifier(head, shares, labels) or head


def with_fitted_classifier(head: AnswerHead, shares: np.ndarray, labels: np.ndarray,
                           c: float = REGION_C) -> AnswerHead | None:
    """``head`` with a region classifier fitted on the regions' built-up shares, or None with fewer than 2 of
    each answer."""
    if labels.sum() < 2 or (1 - labels).sum() < 2:
        log.info("region classifier: %d rural / urban regions, too few to fit; none added", len(labels))
        return None
    features = np.asarray([[region_feature(float(share))] for share in shares])
    weight, bias = fit_logistic(features, labels, c)
    fitted = head.with_region_classifier(float(weight[0]), bias, REGION_TILE_M, BUILT_UP_SCENES)
    log.info("region classifier: fitted on %d regions (%d urban), train accuracy %.3f; urban above a built-up "
             "share of %.3f", len(labels), int(labels.sum()), _accuracy(shares, labels, fitted), urban_threshold(fitted))
    return fitted


def urban_threshold(head: AnswerHead) -> float:
    """The built-up share above which the head's region classifier answers urban."""
    w, b = float(head.tensors["region_w"][0]), float(head.tensors["region_b"][0])
    return float(np.exp(-b / w) - SHARE_FLOOR) if w else float("nan")


def _accuracy(shares: np.ndarray, labels: np.ndarray, head: AnswerHead) -> float:
    """The share of regions whose :meth:`AnswerHead.region_answer` is their label."""
    answers = [head.region_answer(float(x)).label == ("urban" if y > 0.5 else "rural") for x, y in zip(shares, labels)]
    return round(float(np.mean(answers)), 4) if answers else float("nan")


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from engine.pipeline import Pipeline
    from engine.runtime import load_model
    from training.data.loaders import load_rsvqa_split

    path = args.model / ANSWER_HEAD_FILE
    if not path.is_file():
        raise UserInputError(f"{args.model} has no answer head ({ANSWER_HEAD_FILE}); train one first")
    pipeline = Pipeline(load_model(args.model, backend=args.backend, device="cpu"))
    train_x, train_y = region_rows(pipeline, load_rsvqa_split(args.rsvqa_lr, "train"))
    val_x, val_y = region_rows(pipeline, load_rsvqa_split(args.rsvqa_lr, "val"))
    head = with_fitted_classifier(AnswerHead.load(path), train_x, train_y, args.c)
    if head is None:
        raise UserInputError(f"{args.rsvqa_lr}: too few rural / urban train regions to fit ({len(train_y)})")
    head.save(path)
    log.info("region classifier written into %s", path)
    return {"model": str(args.model), "tile_m": REGION_TILE_M, "c": args.c, "built_up_scenes": list(BUILT_UP_SCENES),
            "urban_above_share": round(urban_threshold(head), 4),
            "train": {"regions": len(train_y), "urban": int(train_y.sum()), "accuracy": _accuracy(train_x, train_y, head)},
            "val": {"regions": len(val_y), "urban": int(val_y.sum()), "accuracy": _accuracy(val_x, val_y, head)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory with an answer head")
    parser.add_argument("--rsvqa-lr", type=Path, required=True, help="an RSVQA-LR folder (official split format)")
    parser.add_argument("--c", type=float, default=REGION_C, help=f"inverse L2 strength (default {REGION_C})")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return run_report_tool(lambda: _report(args), args.out)


if __name__ == "__main__":
    sys.exit(main())

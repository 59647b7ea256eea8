"""``rsmoe evaluate``: caption (and question) a data split with any model directory and score it.

Writes ``OUT/captions.json`` in the COCO results format (``[{"image_id": <imgid>, "caption": "..."}]``),
``OUT/answers.json`` with ``--vqa`` (each question, its reference answer and the model's),
``OUT/scenes.json`` (each image's plan scene and the scene head's probability for its best scene),
``OUT/metrics.json`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr after lowercasing and stripping punctuation;
VQA accuracy per question type on the UCM-derived VQA set when asked; the share of images whose plan names
their class, and whether the scene head or the router named it) and ``OUT/segments.json`` (what
each expert wrote). SPICE is left out: it downloads Stanford CoreNLP at run time.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from engine.errors import InputNotFoundError, UserInputError
from engine.model.routing import ModelResult, MoEInference
from training.data.records import CaptionRecord

log = logging.getLogger(__name__)


@dataclass
class EvaluateArgs:
    model: Path | None
    data: Path
    split: str
    out: Path
    style: str = "concise"
    backend: str = "torch"
    device: str = "auto"
    batch_size: int = 16
    limit: int | None = None
    vqa: bool = False
    meteor: bool = True
    dtype: str | None = None  # as ``--dtype`` (onnx: float32 | float16 | int8 | static)
    scene_min_confidence: float | None = None  # overrides the model's vision.scene_min_confidence


def _dataset_paths(data: Path) -> tuple[Path, Path]:
    """``data`` is a folder holding ``dataset.json`` (+ ``images/``) or a Karpathy json file."""
    if data.is_dir():
        return data / "dataset.json", data / "images"
    if data.is_file():
        return data, data.parent / "images"
    raise InputNotFoundError(f"data not found: {data}")


def scene_accuracy(records: Sequence[CaptionRecord], scenes: dict[int, str | None], model: MoEInference) -> dict:
    """How often the caption plans' scene is the image's class phrase, how many plans name a scene, and where
    the scene came from."""
    from training.data.vocab import class_phrase

    labelled = [r for r in records if class_phrase(r.class_name)]
    if model.router_kind != "generative":  # the template router names no scene
        return {"source": "none (template router)", "images": len(labelled), "accuracy": None}
    source = "scene head" if model.config.vision.scene_classes else "router adapter"
    correct = sum(scenes.get(r.image_id) == class_phrase(r.class_name) for r in labelled)
    accuracy = round(correct / len(labelled), 4) if labelled else None
    named = sum(scenes.get(r.image_id) is not None for r in labelled)  # below vision.scene_min_confidence: none
    return {"source": source, "images": len(labelled), "accuracy": accuracy, "named": named}


def evaluate(args: EvaluateArgs) -> dict:
    """Run the evaluation and write the three files; returns the metrics."""
    from engine.runtime import load_model
    from training.data import derive_ucm_vqa, load_karpathy
    from training.data.records import evenly_spaced
    from training.metrics import caption_metrics, vqa_accuracy

    dataset_json, images = _dataset_paths(args.data)
    all_records = load_karpathy(dataset_json, images_dir=images)
    records = evenly_spaced([r for r in all_records if r.split == args.split], args.limit)
    if not records:
        raise UserInputError(f"split {args.split!r} of {dataset_json} has no images")
    if args.scene_min_confidence is not None and not 0.0 <= args.scene_min_confidence <= 1.0:
        raise UserInputError(f"--scene-min-confidence must be between 0 and 1, got {args.scene_min_confidence}")
    model = load_model(args.model, args.backend, args.device, args.dtype)
    if args.scene_min_confidence is not None:
        model.config.vision.scene_min_confidence = args.scene_min_confidence
    started = time.perf_counter()
    predictions: dict[int, str] = {}
    results: dict[int, ModelResult] = {}
    for start in tqdm(range(0, len(records), args.batch_size), desc=f"captioning {args.split}", unit="batch"):
        chunk = records[start:start + args.batch_size]
        for record, result in zip(chunk, model.caption([r.image_path for r in chunk], style=args.style)):
            predictions[record.image_id] = result.text
            results[record.image_id] = result
    caption_seconds = time.perf_counter() - started
    metrics: dict = {
        "model": str(args.model or "embedded rsmoe-lite"), "model_id": model.config.model_id,
        "data": str(dataset_json), "split": args.split, "style": args.style, "backend": args.backend,
        "dtype": args.dtype or "float32",
        "images": len(records), "router": model.router_kind,
        "captions": caption_metrics(predictions, {r.image_id: r.captions for r in records}, meteor=args.meteor),
        "caption_seconds": round(caption_seconds, 1),
        "scene": scene_accuracy(records, {i: r.plan.scene for i, r in results.items()}, model),
        "scene_min_confidence": model.config.vision.scene_min_confidence,
    }
    if args.vqa:
        wanted = {r.image_id for r in records}
        paths = {str(r.image_path): r.image_id for r in all_records}
        questions = [q for q in derive_ucm_vqa(all_records) if paths.get(str(q.image_path)) in wanted]
        answers: dict = {}
        for start in tqdm(range(0, len(questions), args.batch_size), desc="answering", unit="batch"):
            chunk = questions[start:start + args.batch_size]
            images = list(dict.fromkeys(str(q.image_path) for q in chunk))  # each image encoded once per chunk
            visual, scene_logits = model.encode(images)
            rows = [images.index(str(q.image_path)) for q in chunk]
            for q, result in zip(chunk, model.ask_features(visual[rows], [q.question for q in chunk],
                                                           None if scene_logits is None else scene_logits[rows])):
                answers[q.question_id] = result.text
        metrics["vqa"] = {"set": "UCM-derived VQA (from class labels and captions)", **vqa_accuracy(questions, answers)}
        answer_rows = [{"question_id": q.question_id, "question_type": q.question_type, "question": q.question,
                        "answer": q.answer, "prediction": answers[q.question_id]} for q in questions]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.vqa:
        (args.out / "answers.json").write_text(json.dumps(answer_rows, indent=1))
    (args.out / "captions.json").write_text(json.dumps(
        [{"image_id": i, "caption": c} for i, c in predictions.items()], indent=1))
    (args.out / "segments.json").write_text(json.dumps(
        {str(k): [asdict(s) for s in r.segments] for k, r in results.items()}, indent=1))
    (args.out / "scenes.json").write_text(json.dumps(  # unrounded: training.scene_gate's thresholds are exact
        {str(k): {"scene": r.plan.scene, "confidence": r.plan.scene_confidence} for k, r in results.items()}, indent=1))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("wrote %s", args.out / "metrics.json")
    return metrics

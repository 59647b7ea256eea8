"""``rsmoe evaluate``: run any model directory over one split of a data set and score it.

``--data DIR`` is detected (:func:`detect_set`) as one of

- a **Karpathy caption set** (``DIR/dataset.json`` whose images carry ``sentences``; images under
  ``DIR/images``; a ``dataset.json`` path works too): UCM-captions, AID with RSICD's captions, Sydney, RSICD ...
- a **class-labelled set** (``dataset.json`` with a top-level ``classes`` list, or images with a ``class``):
  EuroSAT, AID, and UCM (which has a ``class`` per image). A set can be both.
- an **RSVQA split folder** in the official format (``<prefix>split_<split>_{images,questions,answers}.json``
  + ``images/<id>.tif``; ``LR_`` for RSVQA-LR, ``USGS_`` for RSVQA-HR).

Files written to ``OUT`` (the interface other tools read):

- ``metrics.json``: always; ``format``, ``split``, ``images``, the model and backend, and per kind below.
- caption sets: ``captions.json`` = COCO results ``[{"image_id": <imgid, else the index in dataset.json>,
  "caption": "..."}]``; ``metrics.json`` ``captions`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr after lowercasing and
  stripping punctuation; SPICE left out: it downloads Stanford CoreNLP) and ``plan_scene`` (the share of images
  whose caption plan names their class, and whether the scene head or the router named it); ``scenes.json``
  (each image's plan scene and the scene head's probability for its best scene) and ``segments.json`` (what
  each expert wrote). With ``--vqa`` also ``answers.json`` with the UCM-derived questions (question, reference
  ``answer``, ``prediction``) and ``metrics.json`` ``vqa`` (accuracy per type).
- EuroSAT mosaic folders (written by training: images carry their ``cells``' classes): captioned as caption
  sets (``captions.json``, ``scenes.json``, ``segments.json``) and ``metrics.json`` ``covers``: how well the
  captions name the land covers of the cells (:func:`training.metrics.naming_scores`: recall, precision, exact,
  per cover, and over the mixed mosaics); the references are **derived** from class labels, so this measures
  which covers are named, never caption quality.
- class-labelled sets: ``predictions.json`` = ``[{"filename": "<as in dataset.json>", "class": "<one of the
  set's classes, spelled as in dataset.json>"}]`` and ``metrics.json`` ``scene`` (``accuracy``, ``images``,
  ``correct``, ``per_class``, the classes the scene head cannot name). The class is the scene head's
  (``vision.scene_classes``, logits averaged over its ``vision.scene_views`` views), argmax taken only among
  the phrases (:func:`training.data.vocab.class_phrase`) of the set's own classes, so it is always one of them;
  a class whose phrase the head lacks is never predicted. A model without a scene head (or whose head names
  none of the set's classes) cannot predict classes: for a set with captions the captions are still written
  and ``scene`` holds the ``error`` (no ``predictions.json``), for a class-only set it is an input error.
- RSVQA sets: ``answers.json`` = ``[{"question_id": <id>, "answer": "<text>"}]``, one per active question of
  the split, in the dataset's vocabulary (``yes``/``no``, ``rural``/``urban``, ``3``, ``120m2``: the generated
  text through :func:`training.metrics.normalize_rsvqa_answer`); ``answers_raw.json`` (each question, its
  reference, the generated text and the normalised answer); ``metrics.json`` ``rsvqa`` (accuracy per type,
  ``average`` over types and ``overall``; counts and areas scored in the RSVQA buckets 0, 1-10, 11-100,
  101-1000, >1000). Closed questions about an image that spans several of the answer head's region tiles are
  answered as ``rsmoe ask`` answers them: the head sees the tiles' mean scene probabilities, and rural / urban
  comes from the region classifier (:mod:`training.region_classifier`).

Every image is passed with the ground resolution the model sees (native metres per pixel x image width /
``image.image_size``; the width read from the file where the set does not give it, an RSVQA tile's native
resolution from its GeoTIFF georeferencing where the images file lacks ``res_x``; unknown stays None).
``--limit N`` keeps N images evenly spaced over the split (all classes; for RSVQA all questions of N images).
Bad input (missing folder, unknown split or format) raises :class:`engine.errors.UserInputError` (exit 2).
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.errors import InputNotFoundError, RasterError, UserInputError
from engine.model.routing import ModelResult, MoEInference
from engine.pipeline import Pipeline
from training.data.records import CaptionRecord, VQARecord, evenly_spaced, seen_resolution

log = logging.getLogger(__name__)

FORMATS = ("karpathy", "rsvqa")


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


@dataclass
class EvalSet:
    """What :func:`detect_set` found at ``--data``.

    ``format``: ``karpathy`` (a ``dataset.json``: captions and/or classes) or ``rsvqa`` (official split files).
    ``annotation``: the ``dataset.json`` (Karpathy) or the folder (RSVQA); ``images``: the images folder.
    ``captions``: whether images carry reference sentences; ``classes``: the set's classes as spelled in the
    file (its ``classes`` list, else the distinct image ``class`` values; None: not class-labelled).
    """

    format: str
    root: Path
    annotation: Path
    images: Path
    name: str = ""
    captions: bool = False
    classes: list[str] | None = None
    mosaic: bool = False  # a EuroSAT mosaic folder (each image's ``cells``: the records' ``parts``)
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.format == "rsvqa":
            return "RSVQA"
        kinds = (["captions"] if self.captions else []) + (["classes"] if self.classes else [])
        return " + ".join(kinds + (["land covers (derived)"] if self.mosaic else []))

    @property
    def captioned(self) -> bool:
        """Whether the images are captioned: they have reference sentences, or covers to name (a mosaic set)."""
        return self.captions or self.mosaic


_KNOWN_LAYOUTS = ("a folder with dataset.json (Karpathy captions and/or 'classes') + images/, or an RSVQA folder "
                  "with <prefix>split_<split>_{images,questions,answers}.json + images/")


def detect_set(data: Path) -> EvalSet:
    """The format of the data set at ``data`` (a folder, or a Karpathy ``dataset.json`` file)."""
    from training.data.loaders import read_json, rsvqa_split_prefix

    data = Path(data)
    if not data.exists():
        raise InputNotFoundError(f"data not found: {data} (expected {_KNOWN_LAYOUTS})")
    if data.is_dir():
        prefix = rsvqa_split_prefix(data)
        if prefix is not None:
            name = {"LR_": "rsvqa_lr", "USGS_": "rsvqa_hr"}.get(prefix, data.name)
            return EvalSet("rsvqa", data, data, data / "images", name=name, extra={"prefix": prefix})
        dataset_json = data / "dataset.json"
        if not dataset_json.is_file():
            raise UserInputError(f"{data} is not a data set rsmoe evaluate knows: expected {_KNOWN_LAYOUTS}")
    else:
        dataset_json = data
    content = read_json(dataset_json, "dataset file")
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise UserInputError(f"{dataset_json} is not a Karpathy or class-labelled dataset.json: expected a dict "
                             "with an 'images' list")
    items = [i for i in content["images"] if isinstance(i, dict)]
    captions = any(i.get("sentences") for i in items)
    if isinstance(content.get("classes"), list):
        classes = [str(c) for c in content["classes"]]
    else:
        classes = sorted({str(i["class"]) for i in items if i.get("class")}) or None
    if not captions and not classes:
        raise UserInputError(f"{dataset_json} has neither reference sentences nor classes: nothing to evaluate "
                             f"(expected {_KNOWN_LAYOUTS})")
    name = str(content.get("dataset") or dataset_json.parent.name)
    mosaic = any(isinstance(i.get("cells"), list) for i in items)
    if mosaic:
        from training.data.mosaics import COVER_OF_CLASS

        cells = {str(c) for i in items if isinstance(i.get("cells"), list) for c in i["cells"]}
        unknown = sorted(cells - set(COVER_OF_CLASS))
        if unknown:
            raise UserInputError(f"{dataset_json}: mosaic cells of classes without a land cover: {unknown} "
                                 f"(expected EuroSAT's: {', '.join(COVER_OF_CLASS)})")
    return EvalSet("karpathy", dataset_json.parent, dataset_json, dataset_json.parent / "images", name=name,
                   captions=captions, classes=classes, mosaic=mosaic)


# --------------------------------------------------------------------------- ground resolution
def _image_width(path: Path) -> int | None:
    """An image file's width in pixels (PIL reads the header; rasterio for what PIL cannot open)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return int(im.size[0])
    except (UnidentifiedImageError, OSError):
        pass
    try:
        from engine.raster import RasterSource

        with RasterSource(path) as src:
            return int(src.width)
    except RasterError:
        return None


def _geotiff_resolution(path: Path) -> float | None:
    """Metres per pixel from a GeoTIFF's georeferencing (None without it)."""
    from engine.raster import RasterSource

    try:
        with RasterSource(path) as src:
            return src.ground_resolution
    except RasterError:
        return None


def image_seen_resolution(path: Path, native_m: float | None, width: int | None, input_size: int,
                          from_georeference: bool = False) -> float | None:
    """Metres per pixel of what the model sees for one image (None when the native resolution is unknown)."""
    if native_m is None and from_georeference and Path(path).suffix.lower() in (".tif", ".tiff"):
        native_m = _geotiff_resolution(path)
    if native_m is None:
        return None
    return seen_resolution(native_m, width or _image_width(path), input_size)


# --------------------------------------------------------------------------- scene head
@dataclass
class ClassMap:
    """The set's classes the scene head can name: ``names[k]`` is the head's column ``columns[k]``."""

    names: list[str]
    columns: list[int]
    missing: list[str]  # classes whose phrase the head does not know (never predicted)


def class_map(classes: Sequence[str], scene_classes: Sequence[str]) -> ClassMap:
    """Map the set's class names to the scene head's phrases (:func:`class_phrase`, case-insensitive)."""
    from training.data.vocab import class_phrase

    head = {str(s).strip().lower(): i for i, s in enumerate(scene_classes)}
    names, columns, missing = [], [], []
    for name in classes:
        phrase = (class_phrase(name) or "").lower()
        if phrase in head:
            names.append(name)
            columns.append(head[phrase])
        else:
            missing.append(name)
    return ClassMap(names, columns, missing)


def predict_classes(scene_logits: Any, mapping: ClassMap) -> list[str]:
    """Each image's class: the argmax of the (view-averaged) scene logits among the set's mapped classes."""
    from engine.model.routing import softmax_rows

    probabilities = softmax_rows(scene_logits)[:, mapping.columns]
    return [mapping.names[int(k)] for k in probabilities.argmax(-1)]


def class_accuracy(records: Sequence[CaptionRecord], predicted: dict[int, str], mapping: ClassMap,
                   classes: Sequence[str], views: int) -> dict:
    """Accuracy of the predicted classes over the labelled images, overall and per class."""
    labelled = [r for r in records if r.class_name]
    per_class: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in labelled:
        per_class[r.class_name][1] += 1
        per_class[r.class_name][0] += predicted.get(r.image_id) == r.class_name
    correct = sum(c for c, _ in per_class.values())
    return {
        "source": "scene head", "views": views, "images": len(labelled),
        "accuracy": round(correct / len(labelled), 4) if labelled else None, "correct": correct,
        "classes": len(classes), "unpredictable_classes": mapping.missing,
        "per_class": {c: {"images": n, "accuracy": round(k / n, 4)} for c, (k, n) in sorted(per_class.items())},
    }


def scene_accuracy(records: Sequence[CaptionRecord], scenes: dict[int, str | None], model: MoEInference) -> dict:
    """How often the caption plans' scene is the image's class phrase, how many plans name a scene, and where
    the scene came from (``plan_scene`` in metrics.json)."""
    from training.data.vocab import class_phrase

    labelled = [r for r in records if class_phrase(r.class_name)]
    if model.router_kind != "generative":  # the template router names no scene
        return {"source": "none (template router)", "images": len(labelled), "accuracy": None}
    source = "scene head" if model.config.vision.scene_classes else "router adapter"
    correct = sum(scenes.get(r.image_id) == class_phrase(r.class_name) for r in labelled)
    accuracy = round(correct / len(labelled), 4) if labelled else None
    named = sum(scenes.get(r.image_id) is not None for r in labelled)  # below vision.scene_min_confidence: none
    return {"source": source, "images": len(labelled), "accuracy": accuracy, "named": named}


def _encode(model: MoEInference, images: Sequence[Any], head_logits: bool) -> tuple[Any, Any, Any]:
    """Visual tokens, the scene logits the router uses (as :meth:`MoEInference.encode`) and the view-averaged
    head logits for class predictions (also with the template router, when ``head_logits``)."""
    pixels = model.preprocess(images)
    visual = model.encode_images(pixels)
    generative = model.router_kind == "generative"
    logits = model.view_scene_logits(pixels, visual) if (generative or head_logits) else None
    return visual, logits if generative else None, logits


# --------------------------------------------------------------------------- the runs
def _base_metrics(args: EvaluateArgs, data: EvalSet, model: MoEInference) -> dict:
    return {
        "model": str(args.model or "embedded rsmoe-lite"), "model_id": model.config.model_id,
        "data": str(data.annotation), "format": data.format, "set": data.name, "kind": data.describe(),
        "split": args.split, "backend": args.backend, "dtype": args.dtype or "float32", "router": model.router_kind,
        "decoding": {"num_beams": model.config.generation.num_beams,
                     "length_penalty": model.config.generation.length_penalty,
                     "repetition_penalty": model.config.generation.repetition_penalty},
    }


def _load_karpathy_records(args: EvaluateArgs, data: EvalSet) -> tuple[list[CaptionRecord], list[CaptionRecord]]:
    from training.data import load_karpathy
    from training.data.loaders import KNOWN_RESOLUTIONS_M

    # all splits for --vqa (the derived questions use class statistics over the whole set)
    all_records = load_karpathy(data.annotation, images_dir=data.images, split=None if args.vqa else args.split,
                                ground_resolution_m=KNOWN_RESOLUTIONS_M.get(data.name))
    in_split = [r for r in all_records if r.split == args.split]
    if not in_split:
        splits = sorted({r.split for r in all_records})
        raise UserInputError(f"split {args.split!r} of {data.annotation} has no images; its splits are {splits}")
    return all_records, evenly_spaced(in_split, args.limit)


def _evaluate_karpathy(args: EvaluateArgs, data: EvalSet, model: MoEInference, metrics: dict,
                       all_records: list[CaptionRecord], records: list[CaptionRecord]) -> dict[str, Any]:
    """Captions and/or class predictions; returns the files to write."""
    from training.metrics import caption_metrics

    files: dict[str, Any] = {}
    scene_classes = model.config.vision.scene_classes
    mapping = class_map(data.classes, scene_classes) if data.classes and scene_classes else None
    class_error = None
    if data.classes and not scene_classes:
        class_error = (f"the model has no scene head (vision.scene_classes is empty): it cannot predict the classes "
                       f"of {data.root}; use a model whose stage 0 (vision_tuning) trained one")
    elif mapping is not None and not mapping.names:
        class_error = (f"none of the {len(data.classes)} classes of {data.root} ({', '.join(data.classes[:5])} ...) "
                       f"is among the scene head's {len(scene_classes)} classes; train the head on this set's classes")
    if class_error and not data.captioned:
        raise UserInputError(class_error)
    if mapping is not None and mapping.missing and mapping.names:
        log.warning("the scene head cannot name %d of the set's %d classes (never predicted): %s",
                    len(mapping.missing), len(data.classes), ", ".join(mapping.missing))
    predict = mapping is not None and bool(mapping.names)

    input_size = model.config.image.image_size
    captions: dict[int, str] = {}
    results: dict[int, ModelResult] = {}
    predicted: dict[int, str] = {}
    started = time.perf_counter()
    what = "captioning" if data.captioned else "classifying"
    for start in tqdm(range(0, len(records), args.batch_size), desc=f"{what} {args.split}", unit="batch"):
        chunk = records[start:start + args.batch_size]
        visual, routing_logits, head_logits = _encode(model, [r.image_path for r in chunk], predict)
        if data.captioned:
            resolutions = [image_seen_resolution(r.image_path, r.ground_resolution_m, r.width, input_size)
                           for r in chunk]
            for record, result in zip(chunk, model.caption_features(visual, args.style, routing_logits, resolutions)):
                captions[record.image_id] = result.text
                results[record.image_id] = result
        if predict:
            for record, name in zip(chunk, predict_classes(head_logits, mapping)):
                predicted[record.image_id] = name
    metrics["seconds"] = round(time.perf_counter() - started, 1)

    if data.captions:
        captioned = [r for r in records if r.captions]
        metrics["captions"] = caption_metrics({r.image_id: captions[r.image_id] for r in captioned},
                                              {r.image_id: r.captions for r in captioned}, meteor=args.meteor)
    if data.mosaic:
        metrics["covers"] = mosaic_cover_scores(records, captions)
    if data.captioned:
        metrics.update({
            "style": args.style, "caption_seconds": metrics["seconds"],
            "plan_scene": scene_accuracy(records, {i: r.plan.scene for i, r in results.items()}, model),
            "scene_min_confidence": model.config.vision.scene_min_confidence,
        })
        files["captions.json"] = [{"image_id": i, "caption": c} for i, c in captions.items()]
        files["segments.json"] = {str(k): [asdict(s) for s in r.segments] for k, r in results.items()}
        files["scenes.json"] = {  # unrounded: training.scene_gate's thresholds are exact
            str(k): {"scene": r.plan.scene, "confidence": r.plan.scene_confidence} for k, r in results.items()}
    if data.classes:
        if predict:
            metrics["scene"] = class_accuracy(records, predicted, mapping, data.classes,
                                              model.config.vision.scene_views)
            files["predictions.json"] = [{"filename": r.filename, "class": predicted[r.image_id]} for r in records]
        else:
            log.error("%s; captions are written, predictions.json is not", class_error)
            metrics["scene"] = {"source": None, "images": sum(bool(r.class_name) for r in records),
                                "accuracy": None, "error": class_error}
    if args.vqa:
        metrics["vqa"], files["answers.json"] = _derived_vqa(args, model, all_records, records)
    return files


def mosaic_cover_scores(records: Sequence[CaptionRecord], captions: dict[int, str]) -> dict[str, Any]:
    """How well the captions of EuroSAT mosaics name the land covers their cells (``parts``) show (derived
    references)."""
    from training.data.mosaics import covers_named, mosaic_covers
    from training.metrics import naming_scores

    missing = [r.filename for r in records if not r.parts]
    if missing:
        raise UserInputError(f"mosaic images without cells in dataset.json: {missing[:3]}")
    scores = naming_scores([covers_named(captions[r.image_id]) for r in records],
                           [mosaic_covers(r.parts) for r in records])
    return {"references": "derived: the EuroSAT classes of each mosaic's cells, as land covers "
                          "(training.data.mosaics.COVER_OF_CLASS; named: COVER_NAMES)", **scores}


def _derived_vqa(args: EvaluateArgs, model: MoEInference, all_records: list[CaptionRecord],
                 records: list[CaptionRecord]) -> tuple[dict, list[dict]]:
    """The UCM-derived questions of the evaluated images (``--vqa``)."""
    from training.data import derive_ucm_vqa
    from training.metrics import vqa_accuracy

    wanted = {r.image_id for r in records}
    by_path = {str(r.image_path): r for r in all_records}
    questions = [q for q in derive_ucm_vqa(all_records)
                 if str(q.image_path) in by_path and by_path[str(q.image_path)].image_id in wanted]
    if not questions:
        raise UserInputError("--vqa: no questions could be derived for the evaluated images")
    input_size = model.config.image.image_size
    answers: dict = {}
    for start in tqdm(range(0, len(questions), args.batch_size), desc="answering", unit="batch"):
        chunk = questions[start:start + args.batch_size]
        images = list(dict.fromkeys(str(q.image_path) for q in chunk))  # each image encoded once per chunk
        visual, routing_logits, _ = _encode(model, images, False)
        rows = [images.index(str(q.image_path)) for q in chunk]
        resolutions = [image_seen_resolution(Path(p), by_path[p].ground_resolution_m, by_path[p].width, input_size)
                       for p in images]
        for q, result in zip(chunk, model.ask_features(
                visual[rows], [q.question for q in chunk], None if routing_logits is None else routing_logits[rows],
                [resolutions[k] for k in rows])):
            answers[q.question_id] = result.text
    rows_out = [{"question_id": q.question_id, "question_type": q.question_type, "question": q.question,
                 "answer": q.answer, "prediction": answers[q.question_id]} for q in questions]
    return {"set": "UCM-derived VQA (from class labels and captions)", **vqa_accuracy(questions, answers)}, rows_out


def _evaluate_rsvqa(args: EvaluateArgs, data: EvalSet, model: MoEInference, metrics: dict,
                    questions: list[VQARecord]) -> dict[str, Any]:
    """Answer every question of the chosen images; normalise the answers into RSVQA's vocabulary."""
    from training.metrics import normalize_rsvqa_answer, rsvqa_accuracy

    by_image: dict[str, list[VQARecord]] = defaultdict(list)
    for q in questions:
        by_image[q.image].append(q)
    images = list(by_image)
    input_size = model.config.image.image_size
    generated: dict[Any, str] = {}
    started = time.perf_counter()
    pipeline = Pipeline(model)  # one feature cache: the region tiles are encoded once for every question
    generated.update(_region_answers(model, pipeline, questions))  # answered there, not again below
    regions = _region_means(pipeline, [by_image[name][0] for name in images])
    for start in tqdm(range(0, len(images), args.batch_size), desc=f"answering {args.split}", unit="batch"):
        chunk = images[start:start + args.batch_size]
        firsts = [by_image[name][0] for name in chunk]
        visual, routing_logits, _ = _encode(model, [q.image_path for q in firsts], False)
        region_probabilities = (None if regions is None
                                else model.region_probabilities(visual, regions[start:start + len(chunk)]))
        resolutions = [image_seen_resolution(q.image_path, q.ground_resolution_m, q.width, input_size,
                                             from_georeference=True) for q in firsts]
        rows = [(k, q) for k, name in enumerate(chunk) for q in by_image[name] if q.question_id not in generated]
        for at in range(0, len(rows), args.batch_size):
            part = rows[at:at + args.batch_size]
            index = [k for k, _ in part]
            for (_, q), result in zip(part, model.ask_features(
                    visual[index], [q.question for _, q in part],
                    None if routing_logits is None else routing_logits[index], [resolutions[k] for k in index],
                    None if region_probabilities is None else region_probabilities[index])):
                generated[q.question_id] = result.text
    answers = {q.question_id: normalize_rsvqa_answer(generated[q.question_id], q.question_type) for q in questions}
    metrics.update({"images": len(images), "questions": len(questions),
                    "seconds": round(time.perf_counter() - started, 1),
                    "rsvqa": rsvqa_accuracy(questions, answers)})
    return {
        "answers.json": [{"question_id": q.question_id, "answer": answers[q.question_id]} for q in questions],
        "answers_raw.json": [{"question_id": q.question_id, "question_type": q.question_type, "image": q.image,
                              "question": q.question, "reference": q.answer, "generated": generated[q.question_id],
                              "answer": answers[q.question_id]} for q in questions],
    }


def _region_means(pipeline: Pipeline, questions: Sequence[VQARecord]) -> list[Any] | None:
    """Each question's image's region as the answer head sees it, as ``rsmoe ask`` computes it
    (:meth:`engine.pipeline.Pipeline.head_region_mean`: None for an image of about one tile, or for every image
    where the head has no region inputs); None where no image has one."""
    from engine.inputs import ImageInput

    means = [pipeline.head_region_mean(ImageInput(path=str(q.image_path), ground_resolution_m=q.ground_resolution_m))
             for q in questions]
    return means if any(m is not None for m in means) else None


def _region_answers(model: MoEInference, pipeline: Pipeline, questions: Sequence[VQARecord]) -> dict[Any, str]:
    """Rural / urban questions answered as ``rsmoe ask`` answers them where the answer head has a region
    classifier (:meth:`engine.pipeline.Pipeline.ask`: from the built-up share of the region's tiles)."""
    from engine.inputs import ImageInput

    head = model.answer_head
    if head is None or not head.has_region_classifier:
        return {}
    return {q.question_id: pipeline.ask(ImageInput(path=str(q.image_path), ground_resolution_m=q.ground_resolution_m),
                                        q.question).text
            for q in questions if model.closed_kind(q.question) == "rural_urban"}


def evaluate(args: EvaluateArgs) -> dict:
    """Detect the set, run the model over the split, write the files (module docstring); returns the metrics."""
    from engine.runtime import load_model
    from training.data.loaders import load_rsvqa_split

    if args.scene_min_confidence is not None and not 0.0 <= args.scene_min_confidence <= 1.0:
        raise UserInputError(f"--scene-min-confidence must be between 0 and 1, got {args.scene_min_confidence}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {args.limit}")
    data = detect_set(args.data)
    log.info("%s: %s set (%s)", args.data, data.describe(), data.format)
    if data.format == "rsvqa":
        if args.vqa:
            log.info("--vqa: an RSVQA set is scored on its own questions")
        questions = load_rsvqa_split(data.root, args.split, dataset=data.name)
        keep = set(evenly_spaced(list(dict.fromkeys(q.image for q in questions)), args.limit))
        questions = [q for q in questions if q.image in keep]
    else:
        if args.vqa and not data.captions:
            raise UserInputError(f"--vqa derives questions from reference captions, and {data.annotation} has none")
        all_records, records = _load_karpathy_records(args, data)

    model = load_model(args.model, args.backend, args.device, args.dtype)
    if args.scene_min_confidence is not None:
        model.config.vision.scene_min_confidence = args.scene_min_confidence
    metrics = _base_metrics(args, data, model)
    if data.format == "rsvqa":
        files = _evaluate_rsvqa(args, data, model, metrics, questions)
    else:
        metrics["images"] = len(records)
        files = _evaluate_karpathy(args, data, model, metrics, all_records, records)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (args.out / name).write_text(json.dumps(content, indent=1))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("wrote %s (%s)", args.out / "metrics.json", ", ".join(files))
    return metrics


def summary(metrics: dict) -> dict:
    """The headline figures of a metrics dict (one line for the CLI)."""
    out: dict[str, Any] = {"set": metrics.get("set"), "split": metrics.get("split"), "images": metrics.get("images")}
    if "captions" in metrics:
        out["captions"] = metrics["captions"]
    if "covers" in metrics:
        out["covers (derived)"] = {k: metrics["covers"][k] for k in ("recall", "precision", "exact")}
    if "scene" in metrics:
        out["scene"] = {k: metrics["scene"].get(k) for k in ("accuracy", "images", "error") if k in metrics["scene"]}
    if "vqa" in metrics:
        out["vqa"] = {"overall": metrics["vqa"]["overall"], "per_type": metrics["vqa"]["per_type"]}
    if "rsvqa" in metrics:
        out["rsvqa"] = {k: metrics["rsvqa"][k] for k in ("average", "overall", "per_type", "count")}
    return out

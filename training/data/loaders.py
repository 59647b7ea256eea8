"""Loaders for the caption and VQA annotation formats the project reads.

- Karpathy ``dataset.json`` (UCM-captions, Sydney-captions, RSICD, RSITMD, NWPU-Captions):
  ``{"dataset": ..., "images": [{"filename", "imgid", "split", "sentences": [{"raw", "tokens"}], "class"?, "filepath"?}]}``
- RSICap / RSIEval (RSGPT): a JSON list of ``{"filename", "caption"}`` (a dict wrapping that list under
  ``annotations`` / ``data`` / ``images`` is accepted too). The file has no split: the caller names it.
- Class-labelled sets (EuroSAT, AID): the same ``dataset.json`` with ``classes`` and ``class`` on every image;
  ``sentences`` where the set has them (AID: RSICD's human captions), none for EuroSAT; optional
  ``ground_resolution_m`` and ``image_size`` for the whole set. Images are under ``images/``.
- RSVQA official split format: ``<prefix>split_<split>_{images,questions,answers}.json`` (``LR_`` for
  RSVQA-LR, ``USGS_`` for RSVQA-HR) with images ``images/<id>.tif``; only ``active`` records count.
- RSVQA: a JSON list of ``{"question", "answer", "image", "question_id", "type"}`` (optionally wrapped under
  ``questions`` / ``data`` / ``annotations``). The split is the record's ``split`` field if present, else the
  ``split`` argument, else read from the file name (``test_qa.json`` -> ``test``), else ``all``.

Given ``images_dir`` (and ``check_images``, the default), a loader checks that every image exists and raises
:class:`engine.errors.InputNotFoundError` listing the missing ones. Without ``images_dir``, ``image_path`` is
resolved against the annotation file's folder and nothing is checked.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine.errors import InputNotFoundError, UserInputError
from training.data.records import CaptionRecord, VQARecord

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
_MAX_LISTED_MISSING = 10


def read_json(path: Path, what: str = "annotation file") -> Any:
    """A JSON file's content; a missing, invalid or non-UTF-8 file raises a user-input error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path} is not UTF-8 text: {exc}") from exc


def _unwrap_list(data: Any, path: Path, keys: Sequence[str], what: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in keys:
            if isinstance(data.get(key), list):
                return data[key]
    raise UserInputError(f"{path} is not {what}: expected a JSON list (or a dict with one of {list(keys)})")


def _split_filter(split: str | Iterable[str] | None) -> set[str] | None:
    if split is None:
        return None
    return {split} if isinstance(split, str) else set(split)


def _collapse(text: str) -> str:
    return " ".join(str(text).split())


def check_images_exist(paths: Iterable[Path], images_dir: Path, source: Path | str) -> None:
    """Raise :class:`InputNotFoundError` naming the missing images (the first few and how many)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputNotFoundError(f"images directory not found: {images_dir}")
    paths = list(paths)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(images_dir)) if p.is_relative_to(images_dir) else str(p)
                          for p in missing[:_MAX_LISTED_MISSING])
        more = f" and {len(missing) - _MAX_LISTED_MISSING} more" if len(missing) > _MAX_LISTED_MISSING else ""
        raise InputNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing from {images_dir}: {shown}{more}"
        )


def _check_requested_split(records: list[Any], wanted: set[str] | None, available: set[str], path: Path) -> None:
    if wanted is not None and not records:
        raise UserInputError(f"{path} has no records in split {sorted(wanted)}; its splits are {sorted(available)}")


def load_karpathy(
    path: str | Path,
    images_dir: str | Path | None = None,
    split: str | Iterable[str] | None = None,
    dataset: str | None = None,
    check_images: bool = True,
    ground_resolution_m: float | None = None,
) -> list[CaptionRecord]:
    """Read a Karpathy-format ``dataset.json``; ``split`` keeps only those splits (``None``: all).

    A class-labelled file (a ``classes`` list) keeps its images without sentences (their ``captions`` are
    empty); otherwise such images are skipped. The native ground resolution is the file's
    ``ground_resolution_m``, else ``ground_resolution_m``; the width the image's ``width``, else the file's
    ``image_size``; an image's ``cells`` (a mosaic's: each cell's class) are its record's ``parts``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserInputError(f"{path} is not a Karpathy caption file: expected a dict with an 'images' list")
    name = dataset or str(data.get("dataset") or path.stem)
    class_labelled = isinstance(data.get("classes"), list)
    set_gsd = _positive_number(data.get("ground_resolution_m"), path, "ground_resolution_m")
    set_gsd = set_gsd if set_gsd is not None else ground_resolution_m
    set_width = _positive_number(data.get("image_size"), path, "image_size")
    wanted = _split_filter(split)
    base = Path(images_dir) if images_dir is not None else path.parent
    records: list[CaptionRecord] = []
    available: set[str] = set()
    skipped = 0
    for index, item in enumerate(data["images"]):
        if not isinstance(item, dict) or "filename" not in item:
            raise UserInputError(f"{path}: image entry {index} has no 'filename'")
        item_split = str(item.get("split", "train"))
        available.add(item_split)
        if wanted is not None and item_split not in wanted:
            continue
        captions = []
        for sentence in item.get("sentences", []):
            raw = sentence.get("raw") if isinstance(sentence, dict) else sentence
            if raw is None and isinstance(sentence, dict):
                raw = " ".join(sentence.get("tokens", []))
            text = _collapse(raw or "")
            if text:
                captions.append(text)
        class_name = item.get("class")
        if class_labelled and not class_name:
            raise UserInputError(f"{path}: image entry {index} has no 'class' (the file lists 'classes')")
        if not captions and not class_labelled:
            skipped += 1
            continue
        rel = Path(item["filepath"]) / item["filename"] if item.get("filepath") else Path(item["filename"])
        width = _positive_number(item.get("width"), path, "width") or set_width
        cells = item.get("cells", [])
        if not isinstance(cells, list):
            raise UserInputError(f"{path}: image entry {index}: 'cells' must be a list of class names")
        records.append(
            CaptionRecord(
                image_id=int(item.get("imgid", index)),
                image_path=base / rel,
                split=item_split,
                class_name=str(class_name) if class_name else None,
                captions=captions,
                dataset=name,
                filename=str(rel),
                ground_resolution_m=set_gsd,
                width=int(width) if width else None,
                parts=[str(c) for c in cells],
            )
        )
    if skipped:
        log.warning("%s: skipped %d images without captions", path, skipped)
    _check_requested_split(records, wanted, available, path)
    if images_dir is not None and check_images:
        check_images_exist((r.image_path for r in records), Path(images_dir), path)
    log.info("loaded %d caption records from %s", len(records), path)
    return records


def _positive_number(value: Any, path: Path, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserInputError(f"{path}: {key} must be a positive number, got {value!r}")
    return float(value)


def load_rsicap(
    path: str | Path,
    images_dir: str | Path | None = None,
    split: str = "train",
    dataset: str = "rsicap",
    check_images: bool = True,
) -> list[CaptionRecord]:
    """Read an RSICap / RSIEval JSON list of ``{"filename", "caption"}``; every record gets ``split``.

    Records that share a filename are merged into one record with several captions.
    """
    path = Path(path)
    items = _unwrap_list(read_json(path), path, ("annotations", "data", "images"), "an RSICap file")
    base = Path(images_dir) if images_dir is not None else path.parent
    by_name: dict[str, CaptionRecord] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "filename" not in item or "caption" not in item:
            raise UserInputError(f"{path}: record {index} needs 'filename' and 'caption'")
        text = _collapse(item["caption"])
        if not text:
            continue
        name = str(item["filename"])
        record = by_name.get(name)
        if record is None:
            record = CaptionRecord(
                image_id=len(by_name), image_path=base / name, split=split, class_name=None,
                captions=[], dataset=dataset, filename=name,
            )
            by_name[name] = record
        record.captions.append(text)
    records = list(by_name.values())
    if images_dir is not None and check_images:
        check_images_exist((r.image_path for r in records), Path(images_dir), path)
    log.info("loaded %d caption records from %s", len(records), path)
    return records


def _split_from_filename(path: Path) -> str | None:
    tokens = set(re.split(r"[^a-z]+", path.stem.lower()))
    found = [s for s in SPLITS if s in tokens]
    return found[0] if len(found) == 1 else None


def load_rsvqa(
    path: str | Path,
    images_dir: str | Path | None = None,
    split: str | None = None,
    dataset: str | None = None,
    check_images: bool = True,
) -> list[VQARecord]:
    """Read RSVQA-format question records (see the module docstring for how the split is found).

    ``split`` labels records that have no ``split`` field and keeps only records of that split.
    """
    path = Path(path)
    items = _unwrap_list(read_json(path), path, ("questions", "data", "annotations"), "an RSVQA file")
    default_split = split or _split_from_filename(path) or "all"
    base = Path(images_dir) if images_dir is not None else path.parent
    records: list[VQARecord] = []
    required = ("question", "answer", "image")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or any(k not in item for k in required):
            raise UserInputError(f"{path}: record {index} needs {list(required)}")
        image = str(item["image"])
        extra = {k: v for k, v in item.items()
                 if k not in ("question", "answer", "image", "question_id", "type", "split", "dataset")}
        records.append(
            VQARecord(
                image_path=base / image,
                question=_collapse(item["question"]),
                answer=_collapse(item["answer"]),
                question_type=str(item.get("type", "unknown")),
                question_id=item.get("question_id", index),
                split=str(item.get("split") or default_split),
                image=image,
                dataset=str(item.get("dataset") or dataset or path.stem),
                extra=extra,
            )
        )
    if split is not None:
        available = {r.split for r in records}
        records = [r for r in records if r.split == split]
        _check_requested_split(records, {split}, available, path)
    if images_dir is not None and check_images:
        unique = sorted({r.image_path for r in records})
        check_images_exist(unique, Path(images_dir), path)
    log.info("loaded %d VQA records from %s", len(records), path)
    return records


def shared_data_dir(start: str | Path | None = None) -> Path:
    """The project's shared data folder (``../shared/data`` beside the repository root).

    Looks in ``$RSMOE_SHARED_DATA`` first, then walks up from ``start`` (default: this file) for a
    ``shared/data`` folder.
    """
    import os

    env = os.environ.get("RSMOE_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(start or __file__).resolve()
    for parent in [here, *here.parents]:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    raise InputNotFoundError("shared data folder not found (set RSMOE_SHARED_DATA or place shared/data beside the repo)")


def load_ucm_captions(
    root: str | Path | None = None, split: str | Iterable[str] | None = None, check_images: bool = True
) -> list[CaptionRecord]:
    """UCM-captions from its folder (``dataset.json`` + ``images/``); default: the shared data copy."""
    root = Path(root) if root is not None else shared_data_dir() / "ucm_captions"
    return load_karpathy(root / "dataset.json", images_dir=root / "images", split=split, dataset="ucm",
                         check_images=check_images, ground_resolution_m=KNOWN_RESOLUTIONS_M["ucm"])


#: Native ground resolution of sets whose files do not say it (metres per pixel).
KNOWN_RESOLUTIONS_M: dict[str, float] = {"ucm": 0.3048}

RSVQA_PREFIXES: tuple[str, ...] = ("LR_", "USGS_", "")


def load_class_folder(root: str | Path, split: str | Iterable[str] | None = None,
                      check_images: bool = True) -> list[CaptionRecord]:
    """A class-labelled set laid out as ``root/dataset.json`` + ``root/images/<Class>/<file>`` (EuroSAT, AID)."""
    root = Path(root)
    return load_karpathy(root / "dataset.json", images_dir=root / "images", split=split,
                         check_images=check_images)


def rsvqa_split_prefix(root: str | Path) -> str | None:
    """The file prefix of an RSVQA official-split folder (``LR_``, ``USGS_``), or None if it is not one."""
    root = Path(root)
    for prefix in RSVQA_PREFIXES:
        if list(root.glob(f"{prefix}split_*_questions.json")):
            return prefix
    return None


def load_rsvqa_split(root: str | Path, split: str, dataset: str | None = None,
                     check_images: bool = True) -> list[VQARecord]:
    """The active questions of one split of an RSVQA folder in the official format
    (``<prefix>split_<split>_{images,questions,answers}.json``, images ``images/<id>.tif``).

    A question is kept when it, its image and its answer are active; ``question_id`` is the file's ``id``;
    ``image`` is ``<id>.tif``; the native ground resolution comes from the images file's ``res_x``
    (``"10m"``) where present."""
    root = Path(root)
    prefix = rsvqa_split_prefix(root)
    if prefix is None:
        raise UserInputError(f"{root} is not an RSVQA folder: no <prefix>split_<split>_questions.json in it")
    name = dataset or ("rsvqa_lr" if prefix == "LR_" else "rsvqa_hr" if prefix == "USGS_" else root.name)
    files = {kind: root / f"{prefix}split_{split}_{kind}.json" for kind in ("images", "questions", "answers")}
    if not files["questions"].is_file():
        splits = sorted(p.name[len(prefix) + 6:-len("_questions.json")]
                        for p in root.glob(f"{prefix}split_*_questions.json"))
        raise UserInputError(f"{root} has no split {split!r}; its splits are {splits}")
    tables = {kind: _unwrap_list(read_json(path), path, (kind,), f"an RSVQA {kind} file")
              for kind, path in files.items()}
    images = {item["id"]: item for item in tables["images"] if isinstance(item, dict) and item.get("active")}
    answers: dict[Any, str] = {}
    for item in tables["answers"]:
        if isinstance(item, dict) and item.get("active", True) and "question_id" in item:
            answers.setdefault(item["question_id"], _collapse(item.get("answer", "")))
    records: list[VQARecord] = []
    for index, item in enumerate(tables["questions"]):
        if not isinstance(item, dict) or any(k not in item for k in ("id", "img_id", "question")):
            raise UserInputError(f"{files['questions']}: record {index} needs 'id', 'img_id' and 'question'")
        if not item.get("active", True) or item["img_id"] not in images or item["id"] not in answers:
            continue
        image = f"{item['img_id']}.tif"
        records.append(VQARecord(
            image_path=root / "images" / image, question=_collapse(item["question"]), answer=answers[item["id"]],
            question_type=str(item.get("type", "unknown")), question_id=item["id"], split=split, image=image,
            dataset=name, ground_resolution_m=_resolution_from_text(images[item["img_id"]].get("res_x"))))
    if not records:
        raise UserInputError(f"{files['questions']} has no active question with an active image and answer")
    if check_images:
        check_images_exist(sorted({r.image_path for r in records}), root / "images", files["images"])
    log.info("loaded %d VQA records (%d images) from %s split %s", len(records),
             len({r.image for r in records}), root, split)
    return records


def _resolution_from_text(value: Any) -> float | None:
    """``"10m"`` / ``"0.15m"`` / 10 -> metres; anything else -> None."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*m?\s*", str(value)) if value is not None else None
    return float(match.group(1)) if match and float(match.group(1)) > 0 else None

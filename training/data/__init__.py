"""Training data: loaders, typed records, the image dataset, sub-task targets and the UCM-derived VQA set.

See ``training/data/README.md`` for the formats and the derivation rules. The torch dataset names are
imported lazily, so loaders and targets work without importing torch.
"""
from __future__ import annotations

from typing import Any

from engine.model.router_plan import RouterPlan, format_router_plan, parse_router_plan
from training.data.loaders import (
    check_images_exist,
    load_karpathy,
    load_rsicap,
    load_rsvqa,
    load_ucm_captions,
    shared_data_dir,
)
from training.data.records import CaptionRecord, VQARecord
from training.data.subtasks import (
    QUESTION_TYPE_EXPERTS,
    SubtaskTargets,
    clean_sentence,
    derive_subtask_targets,
    experts_for_question,
    infer_scene,
    object_mentions,
    router_target,
    router_target_for_record,
    spatial_phrases,
    targets_for_record,
)
from training.data.ucm_vqa import DerivedVQAConfig, derive_ucm_vqa, vqa_statistics, write_rsvqa_json
from training.data.vocab import UCM_CLASSES, class_phrase

_LAZY = {"AugmentConfig", "ImageRecordDataset", "augment_array", "collate_records"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from training.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'training.data' has no attribute {name!r}")


__all__ = [
    "AugmentConfig",
    "CaptionRecord",
    "DerivedVQAConfig",
    "ImageRecordDataset",
    "QUESTION_TYPE_EXPERTS",
    "RouterPlan",
    "SubtaskTargets",
    "UCM_CLASSES",
    "VQARecord",
    "augment_array",
    "check_images_exist",
    "class_phrase",
    "clean_sentence",
    "collate_records",
    "derive_subtask_targets",
    "derive_ucm_vqa",
    "experts_for_question",
    "format_router_plan",
    "infer_scene",
    "load_karpathy",
    "load_rsicap",
    "load_rsvqa",
    "load_ucm_captions",
    "object_mentions",
    "parse_router_plan",
    "router_target",
    "router_target_for_record",
    "shared_data_dir",
    "spatial_phrases",
    "targets_for_record",
    "vqa_statistics",
    "write_rsvqa_json",
]

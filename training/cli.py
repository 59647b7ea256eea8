"""``rsmoe train`` and ``rsmoe evaluate`` (registered through the ``rsmoe.commands`` entry point)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.commands import add_model_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="two-stage RS-MoE training from a YAML config (resumable)")
    p.add_argument("--config", type=Path, required=True, help="training config (see training/configs/)")
    p.add_argument("--out", type=Path, default=None, help="output directory (overrides the config's)")
    p.add_argument("--cache-dir", type=Path, default=None, help="vision-feature cache (overrides the config's)")
    p.add_argument("--one-stage", action="store_true",
                   help="ablation: train the experts from scratch in one stage (no dense initialisation)")
    p.add_argument("--until", choices=["vision", "stage1", "stage2"], default="stage2",
                   help="stop after this stage (vision = stage 0); the same command without it resumes")
    p.add_argument("--answer-head-of", type=Path, default=None, metavar="MODEL_DIR",
                   help="only learn the answer head (and its region classifier) of this trained model again, from "
                        "the config's data and answer_head settings, after refitting its scene head where the config's "
                        "scene_head_refit is enabled (the model's other weights are kept)")
    p.add_argument("--record-resolutions-of", type=Path, default=None, metavar="MODEL_DIR",
                   help="only write the config's data's trained resolution ranges (per set and per scene class) "
                        "into this trained model's config.json (its weights are kept)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", help="run a model over a data split and score it: captions (BLEU, METEOR, ROUGE-L, CIDEr), "
                         "classes (scene head accuracy) or RSVQA answers (accuracy per type)")
    add_model_options(p)
    p.add_argument("--data", type=Path, required=True,
                   help="a data set folder, format detected: dataset.json + images/ (Karpathy captions and/or "
                        "classes: UCM, AID, EuroSAT) or an RSVQA split folder "
                        "(<prefix>split_<split>_*.json + images/)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: metrics.json + captions.json / predictions.json / answers.json")
    p.add_argument("--style", default="concise", choices=["concise", "detailed"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None,
                   help="only N images, evenly spaced over the split (all classes; RSVQA: all questions of N images)")
    p.add_argument("--vqa", action="store_true", help="also score the UCM-derived VQA questions of the split")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a JVM)")
    p.add_argument("--scene-min-confidence", type=float, default=None, metavar="P",
                   help="override the model's vision.scene_min_confidence (0-1): below it concise-caption plans name no scene")
    p.set_defaults(func=cmd_evaluate)


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.train import record_resolutions_of, relearn_answer_head, train

    config = TrainConfig.load(args.config)
    if args.out is not None:
        config.out = str(args.out)
    if args.cache_dir is not None:
        config.cache_dir = str(args.cache_dir)
    if args.one_stage:
        config.one_stage = True
    if args.record_resolutions_of is not None:
        final = record_resolutions_of(args.record_resolutions_of, config)
        sys.stdout.write(f"resolution ranges recorded: {final}\n")
        return 0
    if args.answer_head_of is not None:
        final = relearn_answer_head(args.answer_head_of, config)
        sys.stdout.write(f"answer head learnt: {final}\n")
        return 0
    final = train(config, until=args.until)
    sys.stdout.write(f"trained model: {final}\n")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import EvaluateArgs, evaluate, summary

    metrics = evaluate(EvaluateArgs(args.model, args.data, args.split, args.out, args.style, args.backend,
                                    args.device, args.batch_size, args.limit, args.vqa, not args.no_meteor,
                                    args.dtype, args.scene_min_confidence))
    sys.stdout.write(json.dumps(summary(metrics)) + "\n")
    return 0

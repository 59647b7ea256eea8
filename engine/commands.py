"""The engine's subcommands of ``rsmoe`` (registered through the ``rsmoe.commands`` entry point).

Handlers import the heavy modules lazily so ``rsmoe --help`` stays quick.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--backend``, ``--device``, ``--dtype``: shared by every command that runs the model."""
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the embedded rsmoe-lite, or $RSMOE_MODEL)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                        help="inference backend: torch, or onnx (graphs written by `rsmoe export`)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute precision (default: float32)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("base-models", help="provision the pretrained base weights into the local cache")
    p.add_argument("names", nargs="*", help="base models to provision (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild the cache even if present")
    p.add_argument("--verify", action="store_true", help="only verify the cache checksums")
    p.set_defaults(func=cmd_base_models)

    p = subparsers.add_parser("init-model", help="write an (untrained) model directory for a variant")
    p.add_argument("--variant", default="lite", help="lite | 1b | 7b (see engine/model/variants)")
    p.add_argument("--out", type=Path, required=True, help="model directory to create")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. llm.path=/models/llama-3.2-1b (repeatable)")
    p.set_defaults(func=cmd_init_model)

    p = subparsers.add_parser("caption", help="caption images or rasters (one caption per input)")
    p.add_argument("inputs", nargs="+", type=Path, help="image files (PNG, JPEG, GeoTIFF, ...)")
    p.add_argument("--style", default="concise", choices=["concise", "detailed"])
    p.add_argument("--json", action="store_true", help="print one JSON object per input (with expert segments)")
    add_model_options(p)
    p.set_defaults(func=cmd_caption)

    p = subparsers.add_parser("ask", help="ask a question about an image or raster")
    p.add_argument("input", type=Path)
    p.add_argument("question")
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(func=cmd_ask)


def cmd_base_models(args: argparse.Namespace) -> int:
    from engine.base_models import run_cli

    return run_cli(force=args.force, verify_only=args.verify, names=args.names or None)


def cmd_init_model(args: argparse.Namespace) -> int:
    from engine.errors import UserInputError
    from engine.model import RSMoEConfig

    config = RSMoEConfig.variant(args.variant).to_dict()
    for item in args.set:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2 or parts[0] not in config or not isinstance(config[parts[0]], dict):
            raise UserInputError(f"--set takes SECTION.KEY=VALUE (e.g. llm.path=DIR), got {item!r}")
        config[parts[0]][parts[1]] = value
    if args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"{args.out} exists and is not empty; choose a new directory")
    RSMoEConfig.from_dict(config).save(args.out)
    log.info("wrote %s (untrained %s architecture; train it with `rsmoe train`)", args.out / "config.json", args.variant)
    return 0


def _print_result(path: Path, result, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"input": str(path), **result.to_dict()}) + "\n")
    else:
        sys.stdout.write(result.text + "\n")
    sys.stdout.flush()


def cmd_caption(args: argparse.Namespace) -> int:
    from engine.errors import InputNotFoundError
    from engine.runtime import load_model

    for path in args.inputs:
        if not path.is_file():
            raise InputNotFoundError(f"input not found: {path}")
    model = load_model(args.model, args.backend, args.device, args.dtype)
    for path in args.inputs:
        (result,) = model.caption([path], style=args.style)
        _print_result(path, result, args.json)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from engine.errors import InputNotFoundError
    from engine.runtime import load_model

    if not args.input.is_file():
        raise InputNotFoundError(f"input not found: {args.input}")
    model = load_model(args.model, args.backend, args.device, args.dtype)
    (result,) = model.ask([args.input], args.question)
    _print_result(args.input, result, args.json)
    return 0

"""``rsmoe export``: registered through the ``rsmoe.commands`` entry point (heavy imports in the handler)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model directory to ONNX graphs for the onnx backend")
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (default: the embedded rsmoe-lite, or $RSMOE_MODEL)")
    p.add_argument("--variants", default="fp32,fp16,int8,static",
                   help="comma-separated: fp32 (always written), fp16, int8, static (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: MODEL/onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--static-batch", type=int, default=3, help="batch size of the static profile (default: 3)")
    p.add_argument("--static-cache", type=int, default=256,
                   help="KV-cache slots of the static profile: prefix + prompt + new tokens (default: 256)")
    p.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                   help="torch.onnx exporter (default: torchscript, ~8x faster here; dynamo gives the same IO)")
    p.add_argument("--int8-scheme", default="block", choices=["block", "dynamic"],
                   help="int8 variant: block-wise int8 weights (MatMulNBits, default, more accurate) or per-tensor "
                        "dynamic quantisation (MatMulInteger, faster for batches)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity measurement against PyTorch")
    p.add_argument("--if-needed", action="store_true",
                   help="do nothing when the model's export already holds these variants and is current")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from engine.runtime import default_model_dir
    from export.exporter import ExportOptions, export_model

    options = ExportOptions(variants=[v.strip() for v in args.variants.split(",") if v.strip()], opset=args.opset,
                            static_batch=args.static_batch, static_cache=args.static_cache, parity=not args.no_parity,
                            exporter=args.exporter, int8_scheme=args.int8_scheme)
    for noisy in ("onnxscript", "onnx_ir", "onnxruntime", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    model_dir = args.model or default_model_dir()
    if args.if_needed and _export_is_current(model_dir, options.variants, args.out):
        log.info("the ONNX export of %s is current (%s): nothing to do", model_dir, ", ".join(options.variants))
        return 0
    manifest = export_model(model_dir, args.out, options)
    if args.json:
        sys.stdout.write(json.dumps(manifest.to_dict(), indent=2) + "\n")
    for name, variant in manifest.variants.items():
        p = variant.parity
        if p:
            log.info("%s: logits max abs diff prefill %.2e, with past %.2e; greedy identical: %s", name,
                     p["prefill_logits_max_abs"], p["step_with_past_logits_max_abs"], p["greedy_identical"])
    return 0


def _export_is_current(model_dir: Path, variants: list[str], out: Path | None) -> bool:
    """Whether ``model_dir``'s export (``out`` or ``model_dir/onnx``) holds every variant and is made from the model
    as it is now."""
    from engine.backends.onnx import checked_manifest
    from engine.errors import ModelDirError

    try:
        for variant in variants:
            checked_manifest(model_dir, variant, out)
    except ModelDirError:
        return False
    return True

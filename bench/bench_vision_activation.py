"""EfficientNet-Lite0 with the activation its ImageNet weights were trained with (ReLU6) against the Swish the
engine's models up to v20 ran it with: what its frozen features know, and what its ONNX graph costs on CPU.

- **Probe**: a linear classifier (standardised mean visual token, Adam, the best of three weight decays) on the
  frozen base encoder's features of a class-folder set's train split, scored on its val split.
- **Speed**: the base encoder exported to ONNX (opset 17) with each activation, run by ONNX Runtime on CPU as the
  engine runs its vision graph (all graph optimisations, 8 images a call); images/s, best of ``--repeats``, the
  two graphs interleaved round robin so that the other load on this shared machine hits both alike.

    .venv/bin/python bench/bench_vision_activation.py --data ../shared/data/aid_rsicd ../shared/data/eurosat_rgb \\
        --limit 1500 [--out bench/results/vision_activation_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.base_models import base_model_dir  # noqa: E402
from engine.model.config import VISION_ACTIVATIONS, RSMoEConfig  # noqa: E402
from engine.model.image_processing import ImageProcessor  # noqa: E402
from engine.model.vision import EfficientNetLiteEncoder  # noqa: E402
from training.data.loaders import load_class_folder  # noqa: E402

log = logging.getLogger("bench_vision_activation")
ROWS_PER_CALL = 8  # engine.backends.onnx.VISION_ROWS_CPU


def encoders() -> dict[str, EfficientNetLiteEncoder]:
    weights = base_model_dir("efficientnet-lite0")
    return {a: EfficientNetLiteEncoder(weights, a).eval() for a in VISION_ACTIVATIONS}


def probe(encoder: EfficientNetLiteEncoder, processor: ImageProcessor, root: Path, limit: int) -> dict[str, Any]:
    """Val accuracy of a linear probe on the frozen encoder's mean visual token (``limit`` images a split)."""
    records = {split: load_class_folder(root, split=split) for split in ("train", "val")}
    classes = sorted({str(r.class_name) for rows in records.values() for r in rows})
    rng = random.Random(0)
    features, labels = {}, {}
    for split, rows in records.items():
        rows = rng.sample(rows, min(limit, len(rows)))
        chunks = []
        for start in range(0, len(rows), 32):
            pixels = processor([str(r.image_path) for r in rows[start:start + 32]])
            with torch.no_grad():
                chunks.append(encoder(pixels).mean(dim=1))
        features[split] = torch.cat(chunks)
        labels[split] = torch.tensor([classes.index(str(r.class_name)) for r in rows])
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    train, val = (features["train"] - mean) / std, (features["val"] - mean) / std
    best = 0.0
    for weight_decay in (1e-4, 1e-3, 1e-2):
        torch.manual_seed(0)
        linear = nn.Linear(train.shape[1], len(classes))
        optimiser = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=weight_decay)
        for _ in range(300):
            optimiser.zero_grad()
            nn.functional.cross_entropy(linear(train), labels["train"]).backward()
            optimiser.step()
        with torch.no_grad():
            best = max(best, (linear(val).argmax(1) == labels["val"]).float().mean().item())
    return {"set": root.name, "train_images": len(labels["train"]), "val_images": len(labels["val"]),
            "classes": len(classes), "val_accuracy": round(best, 4)}


def onnx_speed(models: dict[str, EfficientNetLiteEncoder], images: int, repeats: int) -> dict[str, Any]:
    """Images/s of each encoder's ONNX graph on ONNX Runtime CPU, interleaved round robin, best of ``repeats``."""
    import onnxruntime as ort

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"vision-{name}.onnx"
            torch.onnx.export(model, (torch.zeros(ROWS_PER_CALL, 3, 224, 224),), str(path), dynamo=False,
                              input_names=["pixel_values"], output_names=["visual"], opset_version=17,
                              dynamic_axes={"pixel_values": {0: "batch"}, "visual": {0: "batch"}})
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((images, 3, 224, 224)).astype(np.float32)
    best = {name: float("inf") for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            for row in range(0, images, ROWS_PER_CALL):
                session.run(None, {"pixel_values": pixels[row:row + ROWS_PER_CALL]})
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: {"seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2)}
            for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="*", default=[], help="class-folder sets to probe (train -> val)")
    parser.add_argument("--limit", type=int, default=1500, help="images a split for the probe (a seeded sample)")
    parser.add_argument("--images", type=int, default=64, help="images a timed ONNX pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vision_activation_cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models = encoders()
    processor = ImageProcessor(RSMoEConfig.variant("lite").image)
    report: dict[str, Any] = {
        "benchmark": "EfficientNet-Lite0 base encoder (frozen ImageNet weights): ReLU6 (as trained) vs Swish",
        "command": "python bench/bench_vision_activation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"),
        "onnx_cpu": onnx_speed(models, args.images, args.repeats),
        "probe": {name: [probe(model, processor, root, args.limit) for root in args.data]
                  for name, model in models.items()},
    }
    speed = report["onnx_cpu"]
    report["relu6_over_swish_speed"] = round(speed["relu6"]["images_per_s"] / speed["swish"]["images_per_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s: %s", args.out, json.dumps({k: report[k] for k in ("onnx_cpu", "probe")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput and peak memory of the lite model on this CPU (writes JSON).

What it measures
    For each stage the real training step of ``rsmoe train`` (:func:`training.train.train_step`: teacher-
    forced loss, backward, clipped AdamW step) runs on real UCM-captions train samples built by
    :mod:`training.samples` from the lite model at ``--init`` (default: the embedded ``rsmoe-lite``
    config), with cached vision features as in a real run. Each stage runs in a fresh process, so its
    ``peak_rss_mb`` (``ru_maxrss``) is that stage's own. After ``--warmup`` steps, ``--steps`` steps are
    timed: ``samples_per_s`` and ``target_tokens_per_s`` (tokens that carry the loss).

    - stage1: the bridge (queries, Q-Former cross-attention, projection) and one LoRA adapter;
    - stage2: the router and the three expert adapters; rows are grouped per adapter within a step.

    Each stage is timed once per ``--precisions`` entry (``fp32``; ``bf16`` = accelerate's bf16 autocast, as
    ``precision: bf16`` in a training config), side by side in one run. It also times one
    (1024 x 576) @ (576 x 1536) matmul in fp32 and bf16, the shape of SmolLM2-135M's MLP at a 16 x 64-token
    batch.

    With ``--run OUT`` it also records the totals of a real ``rsmoe train`` run (its stage directories'
    ``training_state.json`` and stage 0's ``vision/vision_state.json``: samples, seconds of training steps, best
    epoch, stage 0's val accuracy per set and epoch), e.g. the run that produced the embedded model.

    .venv/bin/python bench/bench_training.py [--steps 6] [--warmup 1] [--batch-size 16] [--images 96]
        [--precisions fp32,bf16] [--run RUN_DIR] [--out bench/results/training_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_training")


def matmul_gflops(dtype_name: str, repeats: int = 5) -> float:
    """GFLOP/s of one MLP-shaped matmul in ``dtype_name``."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 1024 * 576 * 1536 * repeats / (time.perf_counter() - started) / 1e9


def measure_stage(stage: str, precision: str, init: str, data: str, images: int, batch_size: int, steps: int,
                  warmup: int, cache_dir: Path) -> dict:
    """Time ``steps`` real training steps of ``stage``; runs inside its own process."""
    import torch

    from engine.model import RSMoEModel
    from training.checkpoints import StagePosition
    from training.config import DataConfig, StageConfig, TrainConfig
    from training.samples import stage1_samples, stage2_samples
    from training.train import (
        build_initial_model,
        load_data,
        prepare_optimisation,
        stage_parameters,
        train_step,
    )

    torch.manual_seed(0)
    config = TrainConfig(init=init, cache_dir=str(cache_dir), precision=precision,
                         data=DataConfig(ucm=data, max_train_images=images, max_val_images=1, augment_variants=1))
    model: RSMoEModel = build_initial_model(config)
    loaded = load_data(model, config)
    train, vqa, image_ids, store = loaded.train, loaded.vqa_train, loaded.image_ids, loaded.train_store
    rng = random.Random(0)
    if stage == "stage1":
        dense = model.config.expert_names[0]
        samples = stage1_samples(model.config, train, vqa, image_ids, dense, rng, len(train) // 4)
    else:
        samples = stage2_samples(model.config, train, vqa, image_ids, rng, len(train) // 2)
    params = stage_parameters(model, stage)
    accelerator, module, optimizer = prepare_optimisation(model, params, StageConfig(lr=1e-4), config.precision)
    model.train()
    position = StagePosition()
    timed_samples, target_tokens, seconds = 0, 0, 0.0
    for step in range(warmup + steps):
        batch = samples[step * batch_size:(step + 1) * batch_size]
        started = time.perf_counter()
        train_step(module, model, optimizer, accelerator, batch, store, position)
        elapsed = time.perf_counter() - started
        position.global_step += 1
        if step >= warmup:
            seconds += elapsed
            timed_samples += len(batch)
            target_tokens += sum(len(model.tokenizer(s.target, add_special_tokens=False).input_ids) + 1 for s in batch)
    return {"stage": stage, "precision": precision, "trainable_parameters": sum(p.numel() for p in params.values()),
            "batch_size": batch_size, "timed_steps": steps, "seconds_per_step": round(seconds / steps, 2),
            "samples_per_s": round(timed_samples / seconds, 3),
            "target_tokens_per_s": round(target_tokens / seconds, 1),
            "adapters_in_first_step": len({s.adapter for s in samples[:batch_size]}),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def run_totals(run_dir: Path) -> dict:
    """Samples, training seconds and selection of each finished stage of a real training run."""
    totals = {"dir": run_dir.name}
    for stage_dir in sorted(p for p in run_dir.iterdir() if (p / "training_state.json").is_file()):
        state = json.loads((stage_dir / "training_state.json").read_text())
        totals[stage_dir.name] = {"steps": state["global_step"], "samples": state["samples"],
                                  "train_seconds": round(state["seconds"], 1),
                                  "samples_per_s": round(state["samples"] / max(state["seconds"], 1e-9), 3),
                                  "best_epoch": state["best_epoch"], "epochs": len(state["history"])}
    vision = run_dir / "vision" / "vision_state.json"
    if vision.is_file():  # stage 0: the tuned encoder blocks and the scene head, on cached lower-block maps
        state = json.loads(vision.read_text())
        totals["vision"] = {"steps": state["global_step"], "samples": state["samples"],
                            "train_seconds": round(state["seconds"], 1),
                            "samples_per_s": round(state["samples"] / max(state["seconds"], 1e-9), 3),
                            "best_epoch": state["best_epoch"], "classes": state.get("classes"),
                            "val_by_epoch": state["history"]}
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="engine/models/rsmoe-lite", help="model dir whose config is trained")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ucm_captions"))
    parser.add_argument("--images", type=int, default=96, help="train images whose samples are used")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated training precisions to time")
    parser.add_argument("--run", type=Path, help="an `rsmoe train --out` directory whose totals are recorded")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "training_cpu.json")
    parser.add_argument("--stage", choices=["stage1", "stage2"], help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.stage:
        result = measure_stage(args.stage, args.precision, args.init, args.data, args.images, args.batch_size,
                               args.steps, args.warmup, args.cache_dir)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    import torch

    stages = []
    with tempfile.TemporaryDirectory() as cache:
        for stage in ("stage1", "stage2"):
            for precision in args.precisions.split(","):
                cmd = [sys.executable, __file__, "--stage", stage, "--precision", precision, "--cache-dir", cache,
                       "--init", args.init, "--data", args.data, "--images", str(args.images),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                log.info("measuring %s in %s", stage, precision)
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
                stages.append(json.loads(done.stdout.strip().splitlines()[-1]))
                log.info("%s %s: %s", stage, precision, stages[-1])
    report = {
        "bench": "training_cpu",
        "command": " ".join(["bench/bench_training.py", *sys.argv[1:]]).replace(str(Path.home()), "~"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "stages": stages,
        "matmul_gflops": {"float32": round(matmul_gflops("float32"), 1),
                          "bfloat16": round(matmul_gflops("bfloat16", repeats=1), 1)},
        "load_avg_at_end": os.getloadavg(),
    }
    if args.run:
        report["run"] = run_totals(args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""Benchmark the inference backends side by side on this machine: torch eager vs ONNX Runtime fp32 vs int8.

Measures, for each backend (timings interleaved round robin in one process, best of N, so that the other load
on this shared machine hits every backend alike; peak memory in one fresh child process per backend):
- caption latency per tile (detailed caption: router + three experts, the engine's real flow; best of N per
  image) on UCM test images, with the new tokens each backend generated (int8 may write other captions);
- decode tokens/s with a fixed number of new tokens (EOS ignored), batch 1 and batch 3;
- the MoE cost: three experts in ONE mixed-adapter batch vs one expert alone vs the three one after another;
- the encoding cost of the scene head's dihedral views (``vision.scene_views``) against one view;
- peak resident memory;
and compares decode speed with the memory-bandwidth bound (weight bytes read per decoding step / ~23 GB/s).

    .venv/bin/python bench/bench_onnx.py [--model DIR] [--out bench/results/onnx_cpu.json]

``DIR/onnx`` must hold the fp32 and int8 variants (``rsmoe export --model DIR --variants fp32,int8``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_onnx")

BACKENDS = ("torch", "onnx-fp32", "onnx-int8")
BANDWIDTH_GBPS = 23.0  # large fp32 matrix-vector product streaming weights on this machine (STACK.md)
UCM = REPO.parent / "shared" / "data" / "ucm_captions"


def ucm_test_images(n: int) -> list[Path]:
    """``n`` images spread over the UCM test split (it is ordered by class: the first few would all be
    agricultural)."""
    from training.data.records import evenly_spaced

    data = json.loads((UCM / "dataset.json").read_text())
    names = evenly_spaced([i["filename"] for i in data["images"] if i.get("split") == "test"], n)
    return [UCM / "images" / name for name in names]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ child side
class TorchRunner:
    """Forced-length greedy generation with the torch backend (transformers' generate, as the engine runs it)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def generate(self, visual: Any, prompts: list[str], adapters: list[str], new_tokens: int) -> tuple[float, float]:
        import torch

        model = self.model
        with torch.no_grad():
            t0 = time.perf_counter()
            batch = model.language_inputs(model.query_embeddings(visual, prompts), prompts)
            model.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                 adapter_names=list(adapters), logits_to_keep=1)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            batch = model.language_inputs(model.query_embeddings(visual, prompts), prompts)
            model.language_model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                          adapter_names=list(adapters), max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                          pad_token_id=model.tokenizer.pad_token_id,
                                          eos_token_id=model.tokenizer.eos_token_id)
            total = time.perf_counter() - t0
        return prefill, max(total - prefill, 1e-9)


class OnnxRunner:
    """Forced-length greedy generation with the ONNX Runtime backend's decoder (same IOBinding path)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def generate(self, visual: Any, prompts: list[str], adapters: list[str], new_tokens: int) -> tuple[float, float]:
        b = self.backend
        t0 = time.perf_counter()
        embeds, mask = b.language_inputs(b.query_embeddings(visual, prompts), prompts)
        logits = b.decoder.start(embeds, mask, b.adapter_mask(adapters))
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = b.decoder.step(b.embed(logits.argmax(-1))[:, None, :])
        return prefill, time.perf_counter() - t0


def load_backend(backend: str, model_dir: Path) -> Any:
    if backend == "torch":
        from engine.model import RSMoEModel

        return RSMoEModel.from_pretrained(model_dir)
    from engine.backends.onnx import OnnxRSMoE

    return OnnxRSMoE.from_model_dir(model_dir, device="cpu", variant=backend.split("-", 1)[1])


def runner_of(model: Any) -> Any:
    return TorchRunner(model) if model.describe()["backend"] == "torch" else OnnxRunner(model)


def memory_child(backend: str, model_dir: Path, image: Path) -> dict[str, Any]:
    """Peak resident memory of one backend in a fresh process: load + one detailed caption."""
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    model = load_backend(backend, model_dir)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    model.caption([image], style="detailed")
    return {"load_s": round(load_s, 2), "rss_before_load_mb": round(rss0, 1),
            "rss_after_load_mb": round(rss_loaded, 1), "peak_rss_mb": round(_peak_mb(), 1)}


def measure_all(models: dict[str, Any], images: list[Path], new_tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Every timing, interleaved across the backends (round robin), so that the other load on this shared
    machine hits them alike; each figure is the best of ``repeats``."""
    import numpy as np

    out: dict[str, dict[str, Any]] = {name: {"describe": m.describe()} for name, m in models.items()}
    for m in models.values():  # warm-up
        m.caption([images[0]], style="detailed")
    latencies: dict[str, list[float]] = {n: [] for n in models}
    captions: dict[str, list[str]] = {n: [] for n in models}
    for image in images:  # best of ``repeats`` per image (greedy decoding: the same caption every time)
        best: dict[str, float] = {}
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                (result,) = m.caption([image], style="detailed")
                best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
                if len(captions[name]) == len(latencies[name]):  # the first run of this image
                    captions[name].append(result.text)
                    out[name]["router"] = result.router
                    out[name].setdefault("caption_new_tokens", []).append(
                        sum(len(m.tokenizer(s.text, add_special_tokens=False)["input_ids"]) + 1 for s in result.segments))
        for name in models:
            latencies[name].append(best[name])
    for name, m in models.items():  # what the scene head's dihedral views add to each tile's encoding
        out[name]["scene_views"] = scene_views_cost(m, images, repeats)
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {n: {} for n in models}
    first = next(iter(models.values()))
    visual = first.encode_images(first.preprocess(images[:1]))
    experts = list(first.config.expert_names)
    prompts = [f"Describe the {e} of this image." for e in experts]
    cases = {"mixed3": (list(range(len(experts))),), "one": ([0],)}
    cases |= {f"seq{i}": ([i],) for i in range(len(experts))}
    for _ in range(repeats):
        for case, (rows,) in cases.items():
            for name, m in models.items():
                v = m.encode_images(m.preprocess(images[:1])) if name != "torch" else visual
                r = runner_of(m).generate(v[[0] * len(rows)], [prompts[i] for i in rows], [experts[i] for i in rows],
                                          new_tokens)
                runs[name].setdefault(case, []).append(r)
    steps = new_tokens - 1
    for name in models:
        best = {case: (min(r[0] for r in rs), min(r[1] for r in rs)) for case, rs in runs[name].items()}
        total = {case: b[0] + b[1] for case, b in best.items()}
        seq = sum(total[f"seq{i}"] for i in range(len(experts)))
        out[name].update({
            "caption_latency_s": [round(x, 3) for x in latencies[name]],
            "caption_latency_mean_s": round(float(np.mean(latencies[name])), 3),
            "captions": captions[name],
            "forced_new_tokens": new_tokens,
            "decode_step_ms_batch1": round(1000 * best["one"][1] / steps, 2),
            "decode_step_ms_batch3": round(1000 * best["mixed3"][1] / steps, 2),
            "decode_tokens_per_s_batch1": round(steps / best["one"][1], 2),
            "decode_tokens_per_s_batch3": round(3 * steps / best["mixed3"][1], 2),
            "prefill_s_batch1": round(best["one"][0], 3),
            "prefill_s_batch3": round(best["mixed3"][0], 3),
            "moe": {
                "three_experts_one_mixed_batch_s": round(total["mixed3"], 3),
                "one_expert_alone_s": round(total["one"], 3),
                "three_experts_sequential_s": round(seq, 3),
                "mixed_over_one": round(total["mixed3"] / total["one"], 3),
                "sequential_over_mixed": round(seq / total["mixed3"], 3),
            },
        })
    return out


def scene_views_cost(model: Any, images: list[Path], repeats: int) -> dict[str, Any]:
    """Encoding time per tile (tokens + scene logits, best of ``repeats``) with the model's
    ``vision.scene_views`` and with the image alone (1 view)."""
    views = model.config.vision.scene_views
    best: dict[int, float] = {}
    try:
        for _ in range(repeats):
            for count in (views, 1):
                model.config.vision.scene_views = count
                for image in images:
                    t0 = time.perf_counter()
                    model.encode([image])
                    best[count] = min(best.get(count, math.inf), time.perf_counter() - t0)
    finally:
        model.config.vision.scene_views = views
    return {"views": views, "encode_s": round(best[views], 4), "encode_one_view_s": round(best[1], 4),
            "views_over_one": round(best[views] / best[1], 2)}


# ------------------------------------------------------------------------------------------ parent side
def _weight_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes of decoder weights read per decoding step, per backend (LoRA stacks included)."""
    from engine.backends.manifest import ONNX_DIR, Manifest

    manifest = Manifest.load(model_dir / ONNX_DIR)
    lora = manifest.decoder.lora_bytes
    out = {f"onnx-{name}": v.decoder_bytes + lora for name, v in manifest.variants.items() if name in ("fp32", "int8")}
    # torch reads the same float32 weights (the input embedding table is read one row per token in both)
    out["torch"] = manifest.variants["fp32"].decoder_bytes + lora
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "engine" / "models" / "rsmoe-lite")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "onnx_cpu.json")
    parser.add_argument("--images", type=int, default=3, help="UCM test images for the caption latency")
    parser.add_argument("--new-tokens", type=int, default=32, help="forced new tokens per decoding run")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the forced-length runs")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "engine"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    images = ucm_test_images(args.images)

    if args.child:
        args.child_out.write_text(json.dumps(memory_child(args.child, args.model, images[0])))
        return 0

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    backends = args.backends.split(",")
    memory: dict[str, Any] = {}
    for backend in backends:  # peak memory: one fresh process per backend
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            log.info("memory: %s", backend)
            cmd = [sys.executable, __file__, "--child", backend, "--child-out", tmp.name, "--model", str(args.model)]
            subprocess.run(cmd, check=True)
            memory[backend] = json.loads(Path(tmp.name).read_text())
    log.info("timings (interleaved)")
    import torch

    models = {b: load_backend(b, args.model) for b in backends}
    results = measure_all(models, images, args.new_tokens, args.repeats)
    threads = {"torch_threads": torch.get_num_threads(), "ort_intra_op_threads": "default (one per physical core)"}
    for name, r in results.items():
        r["memory"] = memory[name]
    weights = _weight_bytes(args.model)
    torch_r = results.get("torch")
    for name, r in results.items():
        step_bound_ms = 1000 * weights[name] / (BANDWIDTH_GBPS * 1e9)
        r["bandwidth"] = {
            "weight_bytes_per_step": weights[name],
            "bound_step_ms": round(step_bound_ms, 2),
            "bound_tokens_per_s_batch1": round(1000 / step_bound_ms, 1),
            "achieved_fraction_batch1": round(step_bound_ms / r["decode_step_ms_batch1"], 3),
        }
        if torch_r and name != "torch":
            r["vs_torch"] = {
                "caption_speedup": round(torch_r["caption_latency_mean_s"] / r["caption_latency_mean_s"], 2),
                "decode_speedup_batch1": round(torch_r["decode_step_ms_batch1"] / r["decode_step_ms_batch1"], 2),
                "decode_speedup_batch3": round(torch_r["decode_step_ms_batch3"] / r["decode_step_ms_batch3"], 2),
                "captions_identical_to_torch": r["captions"] == torch_r["captions"],
                "peak_rss_ratio": round(r["memory"]["peak_rss_mb"] / torch_r["memory"]["peak_rss_mb"], 3),
            }
    fp32_r = results.get("onnx-fp32")
    if fp32_r and "onnx-int8" in results:
        r = results["onnx-int8"]
        r["vs_onnx_fp32"] = {  # the int8 target: faster again than ORT fp32
            "caption_speedup": round(fp32_r["caption_latency_mean_s"] / r["caption_latency_mean_s"], 2),
            "caption_new_tokens_ratio": round(sum(r["caption_new_tokens"]) / sum(fp32_r["caption_new_tokens"]), 3),
            "decode_speedup_batch1": round(fp32_r["decode_step_ms_batch1"] / r["decode_step_ms_batch1"], 2),
            "decode_speedup_batch3": round(fp32_r["decode_step_ms_batch3"] / r["decode_step_ms_batch3"], 2),
            "prefill_speedup_batch1": round(fp32_r["prefill_s_batch1"] / r["prefill_s_batch1"], 2),
            "prefill_speedup_batch3": round(fp32_r["prefill_s_batch3"] / r["prefill_s_batch3"], 2),
            "peak_rss_ratio": round(r["memory"]["peak_rss_mb"] / fp32_r["memory"]["peak_rss_mb"], 3),
        }
    report = {
        "command": "python bench/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], **threads},
        "model": str(args.model.resolve().relative_to(REPO) if args.model.resolve().is_relative_to(REPO)
                     else args.model),
        "images": [p.name for p in images],
        "bandwidth_gbps_assumed": BANDWIDTH_GBPS,
        "targets": {"ort_vs_torch": ">= 1.5x", "int8_vs_ort_fp32": "> 1x", "mixed_over_one": "<= 1.5",
                    "sequential_over_mixed": ">= 2"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    for name, r in results.items():
        log.info("%-10s caption %.2f s/tile, decode %.1f ms/step (b=1) %.1f ms/step (b=3), mixed/one %.2f, "
                 "sequential/mixed %.2f, peak %.0f MB, encode %.3f s (%d views) vs %.3f s (1 view)", name,
                 r["caption_latency_mean_s"], r["decode_step_ms_batch1"], r["decode_step_ms_batch3"],
                 r["moe"]["mixed_over_one"], r["moe"]["sequential_over_mixed"], r["memory"]["peak_rss_mb"],
                 r["scene_views"]["encode_s"], r["scene_views"]["views"], r["scene_views"]["encode_one_view_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a model directory to ONNX graphs + ``manifest.json`` (see :mod:`engine.backends.manifest`)."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from engine.backends import manifest as mf
from engine.backends.onnx import OnnxRSMoE, source_digest
from engine.errors import UserInputError
from engine.model import RSMoEModel
from export import tracing
from export.graphs import StackedLoRA, stack_lora
from export.variants import INT8_SCHEMES, to_fp16, to_int8

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("fp32", "fp16", "int8", "static")

INT8_NOTES = {
    "block": "decoder MatMul weights int8 (MatMulNBits, 8 bits, blocks of 32, symmetric), activations quantised to "
             "int8 per block at run time (accuracy_level 4)",
    "dynamic": "decoder MatMul weights int8 per tensor (quantize_dynamic, MatMulInteger), activations quantised per "
               "tensor at run time; MLP down projections kept float32 (activation outliers)",
}

LAYOUT = {
    "vision": "two graphs: vision (pixels -> visual tokens) and bridge (visual tokens + instruction token ids/mask "
              "-> projected query embeddings). The encoder runs once per tile and its output is what the engine "
              "caches; the bridge depends on the instruction, which differs per row (router prompt, each expert's "
              "prompt, the question), so it runs per row without re-running the encoder.",
    "experts": "shared-base-row-lora",
    "experts_why": "ONE base decoder graph; every adapter's LoRA factors are graph inputs stacked along the rank axis "
                   "(lora.<module>.A: in x E*r, .B: E*r x out, scale folded into B) and adapter_mask (batch x E, "
                   "one-hot; zeros = base model) selects each row's adapter: y = W x + ((x A) * mask_row) B. K experts "
                   "cost the memory of one model plus the small LoRA stacks, and one mixed batch decodes rows of "
                   "different experts in a single pass whose weight reads are shared (decoding is memory-bandwidth "
                   "bound). One merged graph per expert would cost K x the weights and K passes per tile; "
                   "onnxruntime-genai multi-LoRA applies one adapter per batch, not per row.",
    "decoder_io": "optimum's text-generation-with-past naming (past_key_values.N.key/value -> present.N.key/value) "
                  "with inputs_embeds instead of input_ids (the visual prefix is embeddings); position_ids explicit "
                  "(left padding); logits of the last position only",
    "embeddings": "token ids are embedded by the backend from embed_tokens.npy (memory-mapped)",
    "static": "fixed batch, one token per call, fixed-size KV cache written at cache_position (ScatterND) and "
              "returned whole; prefill runs token by token. For TensorRT, which builds engines for fixed shapes.",
}


@dataclass
class ExportOptions:
    """What ``rsmoe export`` writes."""

    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    opset: int = 18
    static_batch: int = 3
    static_cache: int = 256
    parity: bool = True
    exporter: str = "torchscript"  # or "dynamo" (see export.tracing)
    int8_scheme: str = "block"  # or "dynamic" (see export.variants.to_int8)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in mf.VARIANTS]
        if unknown:
            raise UserInputError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(mf.VARIANTS)}")
        if "fp32" not in self.variants:  # the reference every other variant derives from
            self.variants = ["fp32", *self.variants]
        if self.static_batch < 1 or self.static_cache < 8:
            raise UserInputError("--static-batch must be >= 1 and --static-cache >= 8")
        if self.exporter not in ("torchscript", "dynamo"):
            raise UserInputError(f"unknown exporter {self.exporter!r}; use torchscript or dynamo")
        if self.int8_scheme not in INT8_SCHEMES:
            raise UserInputError(f"unknown int8 scheme {self.int8_scheme!r}; use {' or '.join(INT8_SCHEMES)}")
        if self.opset < 18:
            raise UserInputError("the dynamo exporter needs --opset 18 or newer")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("rsmoe", "torch", "transformers", "peft", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _write_side_files(model: RSMoEModel, lora: StackedLoRA, out: Path) -> None:
    from safetensors.numpy import save_file

    model.tokenizer.save_pretrained(out / mf.TOKENIZER_DIR)
    model.qformer_tokenizer.save_pretrained(out / mf.QFORMER_TOKENIZER_DIR)
    tensors = {}
    for module in lora.modules:
        a_name, b_name = mf.lora_names(module)
        tensors[a_name] = lora.a[module].numpy()
        tensors[b_name] = lora.b[module].numpy()
    save_file(tensors, str(out / mf.LORA_FILE), metadata={"adapters": ",".join(lora.adapters), "rank": str(lora.rank)})
    table = model.language_model.get_input_embeddings().weight.detach().float().numpy()
    np.save(out / mf.EMBEDDINGS_FILE, table, allow_pickle=False)
    if model.scene_head is not None:
        save_file({k: v.detach().float().numpy() for k, v in model.scene_head.state_dict().items()},
                  str(out / mf.SCENE_HEAD_FILE))


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _export_graphs(model: RSMoEModel, lora: StackedLoRA, out: Path,
                   options: ExportOptions) -> dict[str, mf.VariantSpec]:
    fp32 = {g: out / "fp32" / f"{g}.onnx" for g in mf.GRAPHS}
    tracing.export_vision(model, fp32["vision"], options.opset, options.exporter)
    tracing.export_bridge(model, fp32["bridge"], options.opset, options.exporter)
    tracing.export_decoder(model, lora, fp32["decoder"], options.opset, options.exporter)
    paths: dict[str, dict[str, Path]] = {"fp32": fp32}
    notes = {"fp32": "reference precision; every dim dynamic",
             "int8": (INT8_NOTES[options.int8_scheme]
                      + "; LoRA factors float; vision and bridge are the fp32 graphs. For CPU (VNNI)."),
             "fp16": "float16 weights and IO (RMSNorm and softmax kept in float32). For CUDA/TensorRT; on CPU "
                     "onnxruntime casts around missing float16 kernels and is slow.",
             "static": ""}
    if "int8" in options.variants:
        int8 = out / "int8" / "decoder.onnx"
        intermediate = getattr(model.language_model.get_base_model().config, "intermediate_size", None)
        to_int8(fp32["decoder"], int8, options.int8_scheme, keep_float_in_features=intermediate)
        paths["int8"] = {"vision": fp32["vision"], "bridge": fp32["bridge"], "decoder": int8}
    if "fp16" in options.variants:
        paths["fp16"] = {g: out / "fp16" / f"{g}.onnx" for g in mf.GRAPHS}
        for g in mf.GRAPHS:
            to_fp16(fp32[g], paths["fp16"][g])
    profile = None
    if "static" in options.variants:
        profile = mf.StaticProfile(batch=options.static_batch, cache_length=options.static_cache,
                                   instruction_tokens=model.config.qformer.max_instruction_tokens,
                                   image_size=model.config.image.image_size)
        static = {g: out / "static" / f"{g}.onnx" for g in mf.GRAPHS}
        sizes = {"batch": profile.batch, "instruction_length": profile.instruction_tokens}
        tracing.fix_dims(fp32["vision"], static["vision"], sizes)
        tracing.fix_dims(fp32["bridge"], static["bridge"], sizes)
        tracing.export_static_decoder(model, lora, static["decoder"], options.opset, profile.batch,
                                      profile.cache_length, options.exporter)
        paths["static"] = static
        notes["static"] = (f"float32, every dim fixed: batch {profile.batch}, instruction tokens "
                           f"{profile.instruction_tokens}, KV cache {profile.cache_length} slots, one token per "
                           "decoder call. For TensorRT (trt_fp16_enable gives fp16 engines).")
    precision = {"fp32": "float32", "fp16": "float16", "int8": "int8", "static": "float32"}
    variants = {}
    for name in options.variants:
        graphs = {g: tracing.graph_spec(p, out) for g, p in paths[name].items()}
        variants[name] = mf.VariantSpec(precision[name], graphs, static=profile if name == "static" else None,
                                        notes=notes[name])
        variants[name].decoder_bytes = _size(paths[name]["decoder"])
    return variants


def export_model(model_dir: str | Path, out: str | Path | None = None,
                 options: ExportOptions | None = None) -> mf.Manifest:
    """Export ``model_dir`` into ``out`` (default ``model_dir/onnx``), replacing it only when all succeeded."""
    options = options or ExportOptions()
    model_dir = Path(model_dir)
    out = Path(out) if out else model_dir / mf.ONNX_DIR
    started = time.perf_counter()
    model = RSMoEModel.from_pretrained(model_dir)  # float32 on CPU: the reference
    model.requires_grad_(False)
    adapters = list(model.language_model.peft_config)
    lora = stack_lora(model, adapters)
    geo = tracing.LMGeometry.of(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _write_side_files(model, lora, tmp)
        variants = _export_graphs(model, lora, tmp, options)
        with torch.no_grad():
            size = model.config.image.image_size
            visual = model.encode_images(torch.zeros(1, 3, size, size))
        manifest = mf.Manifest(
            model_id=model.config.model_id,
            opset=options.opset,
            layout=dict(LAYOUT),
            decoder=mf.DecoderSpec(geo.num_layers, geo.num_kv_heads, geo.head_dim, geo.hidden_size, geo.vocab_size,
                                   adapters=adapters, lora_rank=lora.rank, lora_modules=list(lora.modules),
                                   lora_bytes=(tmp / mf.LORA_FILE).stat().st_size),
            variants=variants,
            trained_adapters=sorted(model.trained_adapters),
            num_query_tokens=model.bridge.num_query_tokens,
            visual_tokens=list(visual.shape[1:]),
            versions={**_versions(), "exporter": options.exporter, "source_sha256": source_digest(model_dir),
                      "int8_scheme": options.int8_scheme if "int8" in options.variants else ""},
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        manifest.save(tmp)
        if options.parity:
            from export.parity import measure

            for name in manifest.variants:
                backend = OnnxRSMoE.from_model_dir(model_dir, device="cpu", variant=name, export_dir=tmp)
                manifest.variants[name].parity.update(measure(model, backend))
                del backend
            manifest.save(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s (%s) in %.0f s", model_dir, out, ", ".join(manifest.variants),
             time.perf_counter() - started)
    return manifest

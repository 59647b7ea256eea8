"""Precision variants derived from the fp32 graphs: fp16 (GPU) and int8 dynamic quantisation (CPU)."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

#: kept in float32 inside fp16 graphs: RMSNorm's sum of squares overflows float16 on real activations
FP16_BLOCKED_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax"]


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with the weights in ``<name>.data`` beside the graph (no 2 GB protobuf limit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def to_fp16(src: Path, dst: Path) -> None:
    """All float tensors and IO in float16, except the ops in :data:`FP16_BLOCKED_OPS` (cast around)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    log.info("fp16: %s", dst.name)
    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True,
                                     op_block_list=FP16_BLOCKED_OPS)
    save_model(model, dst)


def to_int8(src: Path, dst: Path, block_size: int = 32) -> None:
    """Int8 weights for CPU: every MatMul with a constant weight becomes ``MatMulNBits`` (8 bits, symmetric,
    one scale per block of ``block_size`` input rows) with ``accuracy_level=4``, i.e. activations are quantised
    to int8 per block at run time and multiplied with integer (VNNI) kernels. The LoRA factors are graph inputs
    and stay float.

    Measured on the lite decoder (prefill logits of 5 mixed-adapter rows vs PyTorch): per-tensor
    ``quantize_dynamic`` agrees on the top-1 token for 40 % of rows, per-channel for 0 % (SmolLM2's activation
    outliers ruin a per-tensor activation scale); this block-wise scheme for 100 % (max abs logit diff ~0.9)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    log.info("int8: %s", dst.name)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    save_model(quantizer.model.model, dst)

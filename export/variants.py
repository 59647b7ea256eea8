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


def to_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the MatMuls with constant weights (base LM weights; the LoRA factors
    are graph inputs and stay float, activations are quantised on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("int8: %s", dst.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=False, weight_type=QuantType.QInt8,
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True})

"""Choosing and loading a model for inference: model directory, backend and device."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from engine.errors import ModelDirError, UserInputError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
#: ``--dtype`` -> exported ONNX variant
ONNX_VARIANTS = {None: "fp32", "float32": "fp32", "float16": "fp16", "fp32": "fp32", "fp16": "fp16",
                 "int8": "int8", "static": "static"}
DEFAULT_MODEL_ENV = "RSMOE_MODEL"


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model (the arguments of :func:`load_model`): what every Ray worker of a job loads."""

    model_dir: str | None = None
    backend: str = "auto"
    device: str = "auto"
    dtype: str | None = None


def default_model_dir() -> Path:
    """The embedded default model (``engine/models/rsmoe-lite``), unless ``RSMOE_MODEL`` names another."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files("engine").joinpath("models", "rsmoe-lite")))


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` takes CUDA when available; an explicit ``cuda`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserInputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from exc


def onnx_can_run(device: str = "auto", dtype: str | None = None) -> bool:
    """Whether ONNX Runtime could run a model here at ``dtype``: installed, with an exported variant for the
    precision and, for a GPU, the CUDA provider (saying why not)."""
    if dtype not in ONNX_VARIANTS:  # bfloat16: torch only
        return False
    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime is not installed: torch backend")
        return False
    if pick_device(device).type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        log.info("onnxruntime here has no CUDA provider: torch backend on the GPU")
        return False
    return True


def load_model(model_dir: str | Path | None = None, backend: str = "auto", device: str = "auto",
               dtype: str | None = None, threads: int | None = None):
    """Load the model of ``model_dir`` (default: the embedded model) for the chosen backend; ``auto`` takes ONNX
    Runtime (about twice as fast on CPU) when the model's exported graphs for the precision are present and made
    from the model as it is now, torch otherwise (saying why). Its ``describe()["backend"]`` says which ran.
    ``threads``: intra-op threads of ONNX Runtime's sessions (default: its own choice; torch's threads are the
    process's, ``torch.set_num_threads``)."""
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    path = Path(model_dir) if model_dir else default_model_dir()
    if backend == "auto" and dtype in ("int8", "static"):  # only exported graphs have these
        backend = "onnx"
    elif backend == "auto":
        if onnx_can_run(device, dtype):
            try:
                return _load_onnx(path, device, dtype, threads)
            except ModelDirError as exc:  # no export, or a stale one: checked once, here
                log.info("torch backend (%s; `rsmoe export` makes the faster ONNX one)", exc)
        backend = "torch"
    if backend == "onnx":
        return _load_onnx(path, device, dtype, threads)
    from engine.model import RSMoEModel

    dtypes = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        hint = " (an exported ONNX variant: add --backend onnx)" if dtype in ONNX_VARIANTS else ""
        raise UserInputError(f"the torch backend has no dtype {dtype!r}{hint}; use float32, bfloat16 or float16")
    torch_device = pick_device(device)
    log.info("loading %s on %s (%s backend)", path, torch_device, backend)
    return RSMoEModel.from_pretrained(path, device=torch_device, dtype=dtypes[dtype])


def _load_onnx(path: Path, device: str, dtype: str | None, threads: int | None = None):
    """The ONNX Runtime backend over ``path/onnx`` (providers chosen from what onnxruntime offers)."""
    from engine.backends.onnx import OnnxRSMoE

    if dtype not in ONNX_VARIANTS:
        raise UserInputError(f"the onnx backend has no {dtype} graphs; use float32, float16, int8 or static")
    log.info("loading %s (onnx backend, %s variant, device %s)", path, ONNX_VARIANTS[dtype], device)
    return OnnxRSMoE.from_model_dir(path, device=device, variant=ONNX_VARIANTS[dtype], threads=threads)

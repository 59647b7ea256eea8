"""``rsmoe export``: a model directory -> ONNX graphs + ``manifest.json`` for the engine's ONNX Runtime backend.

Layout (see ``export/README.md``): two vision graphs (encoder; Q-Former + projection) and ONE shared base
decoder whose LoRA experts are graph inputs applied per batch row, so K experts cost one model in memory and
decode together in one mixed batch. Variants: fp32, fp16 (GPU), int8 (dynamic quantisation, CPU) and a
static-shape profile (TensorRT). This package imports the engine; the engine never imports it.
"""
from __future__ import annotations

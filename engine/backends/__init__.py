"""Inference backends other than native PyTorch (which is :class:`engine.model.RSMoEModel` itself).

Every backend implements the primitives of :class:`engine.model.routing.MoEInference`, so routing, expert
prompts and fusion exist once. ``engine.backends.manifest`` describes the exported ONNX graphs; it is shared
with the ``export`` package (which imports it; the engine never imports ``export``).
"""
from __future__ import annotations

"""RS-MoE training: data (loaders, sub-task targets, derived VQA), metrics, and the two-stage fine-tuning.

Nothing here is imported by the engine; training imports the model and the shared image preprocessing
from :mod:`engine.model`.
"""
from __future__ import annotations

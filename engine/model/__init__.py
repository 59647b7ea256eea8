"""RS-MoE model definition (config, model, routing); training and export import it from here."""
from __future__ import annotations

from engine.model.config import RSMoEConfig, list_variants
from engine.model.modeling import RSMoEModel
from engine.model.routing import ExpertOutput, ModelResult

__all__ = ["RSMoEConfig", "RSMoEModel", "ModelResult", "ExpertOutput", "list_variants"]

"""RS-MoE engine: runs the RS-MoE vision-language model locally on raster tiles."""
from __future__ import annotations

__version__ = "0.1.0"

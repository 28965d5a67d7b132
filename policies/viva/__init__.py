"""The VIVA instruction-based video editor as an editrl policy (see policy.py)."""

from .policy import VivaOptions, VivaPolicy

__all__ = ["VivaOptions", "VivaPolicy"]

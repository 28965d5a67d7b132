"""A tiny text-to-video flow policy: proves the engine is model-agnostic and keeps engine tests fast."""

from .policy import ToyT2VPolicy

__all__ = ["ToyT2VPolicy"]

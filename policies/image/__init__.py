"""Instruction-based image editors as editrl policies: Qwen-Image-Edit and FLUX.1-Kontext (see base.py)."""

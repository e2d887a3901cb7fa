"""Ops for prompt learning: prompt assembly and cosine-similarity logits.

Methods call these functions, never a backend directly, so that a fused kernel
can replace the PyTorch reference without touching method code.
"""

from .reference import assemble_prompts, cosine_logits

__all__ = ["assemble_prompts", "cosine_logits"]

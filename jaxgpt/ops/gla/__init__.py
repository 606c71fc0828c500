"""Gated Linear Attention ops (FLA layout [B, T, H, D])."""

from jaxgpt.ops.gla.chunk import chunk_gla
from jaxgpt.ops.gla.naive import naive_recurrent_gla

__all__ = ["chunk_gla", "naive_recurrent_gla"]

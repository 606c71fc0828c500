"""Scalar-decay linear attention ("simple GLA") ops (FLA layout [B, T, H, D]): retention, linear attention and
Mamba2's SSD are this op with a fixed, no, or input-dependent per-head decay (docs/kernels-simple-gla.md)."""

from jaxgpt.ops.simple_gla.chunk import chunk_simple_gla
from jaxgpt.ops.simple_gla.naive import naive_recurrent_simple_gla

__all__ = ["chunk_simple_gla", "naive_recurrent_simple_gla"]

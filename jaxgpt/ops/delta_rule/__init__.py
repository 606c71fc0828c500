"""Delta rule (DeltaNet) ops (FLA layout [B, T, H, D])."""

from jaxgpt.ops.delta_rule.chunk import chunk_delta_rule
from jaxgpt.ops.delta_rule.naive import naive_recurrent_delta_rule

__all__ = ["chunk_delta_rule", "naive_recurrent_delta_rule"]

"""Linear-attention ops in JAX, mirroring flash-linear-attention's `fla.ops` (layout [B, T, H, D])."""

from jaxgpt.ops.conv import short_conv
from jaxgpt.ops.delta_rule import chunk_delta_rule, naive_recurrent_delta_rule
from jaxgpt.ops.gated_delta_rule import chunk_gated_delta_rule, gdn_gate, naive_recurrent_gated_delta_rule
from jaxgpt.ops.gla import chunk_gla, naive_recurrent_gla
from jaxgpt.ops.l2norm import l2norm
from jaxgpt.ops.simple_gla import chunk_simple_gla, naive_recurrent_simple_gla

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_simple_gla",
    "gdn_gate",
    "l2norm",
    "naive_recurrent_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_gla",
    "naive_recurrent_simple_gla",
    "short_conv",
]

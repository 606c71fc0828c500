"""RetNet's rotary embedding, jaxgpt (jaxgpt.layers.retnet) and torch_ref (torch_ref.retnet), against FLA 0.6.0's
PyTorch reference `rotary_embedding_ref` with the cos / sin tables `fla.modules.RotaryEmbedding` builds (fp32
positions times inv_freq = 1 / base^(2i / D), not interleaved), fp32, at a position offset (decoding)."""

import jax.numpy as jnp
import numpy as np
import torch

from jaxgpt.layers.retnet import rotary_embedding as jax_rotary
from jaxgpt.spec.constants import ROPE_THETA
from parity_tests.helpers import rel_err
from torch_ref.fla_naive import load_fla_function
from torch_ref.retnet import rotary_embedding as torch_rotary


def test_rotary_matches_fla_reference():
    B, T, H, D, offset = 2, 40, 3, 16, 7
    x = np.random.default_rng(0).standard_normal((B, T, H, D), np.float32)
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(offset, offset + T, dtype=torch.float32), inv_freq)
    rotary_ref = load_fla_function("modules/rotary/ops.py", "rotary_embedding_ref", "rotate_half")
    ref = rotary_ref(torch.from_numpy(x), freqs.cos(), freqs.sin(), interleaved=False)

    got_jax = jax_rotary(jnp.asarray(x), jnp.arange(offset, offset + T))
    got_torch = torch_rotary(torch.from_numpy(x), offset)
    assert rel_err(got_jax, ref) < 1e-6
    assert rel_err(got_torch, ref) < 1e-6
    assert rel_err(x, ref) > 0.1  # the rotation is not the identity at these positions

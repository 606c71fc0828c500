"""torch_ref's decode path of the retnet, linear_attn and hgrn2 layers (their CPU twins through an FLA cache, as an
exported model generates): a prompt, then single tokens, give the full forward's outputs, fp32, within 1e-5. For
retnet this checks that the rotary positions continue from the cache's length, for hgrn2 its state kept transposed
(FLA's state_v_first). Mamba2's: parity_tests/test_mamba2.py, against FLA's own decode step."""

import numpy as np
import pytest
import torch

from parity_tests.helpers import rel_err
from parity_tests.test_mixer_parity import CFG
from torch_ref.linear_attn import new_fla_cache
from torch_ref.mixers import LINEAR_LAYERS

TOL = 1e-5


@pytest.mark.parametrize("kind", ["retnet", "linear_attn", "hgrn2"])
def test_cached_decode_matches_forward(kind):
    torch.manual_seed(0)
    layer = LINEAR_LAYERS[kind](CFG)
    layer.layer_idx = 0
    with torch.no_grad():
        for p in layer.parameters():  # O(1) activations: the harness's N(0, 0.02) weights would hide position errors
            p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]) if p.ndim > 1 else 1 + 0.1 * torch.randn_like(p))
        x = torch.randn(2, 17, CFG.n_embd)
        full = layer(x)
        cache = new_fla_cache()
        steps = [layer(x[:, :13], cache)] + [layer(x[:, t:t + 1], cache) for t in range(13, 17)]
    got = torch.cat(steps, dim=1)
    assert rel_err(got, full) < TOL
    assert rel_err(got[:, 13:], layer(x[:, 13:]).detach()) > 0.01  # the cache matters: the state carries the prompt

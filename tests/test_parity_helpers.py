"""The GPU parity tests' guard for FLA's refused gated backward (parity_tests.helpers.fla_gated_backward)."""

import pytest

from parity_tests.helpers import fla_gated_backward


def test_only_fla_refusal_is_swallowed():
    with fla_gated_backward() as fla:
        raise RuntimeError("chunk_bwd_dqkwg ... see FLA issue #640")
    assert fla.refused
    with fla_gated_backward() as fla:
        grads = [1.0]
    assert not fla.refused and grads == [1.0]
    with pytest.raises(RuntimeError, match="CUDA out of memory"), fla_gated_backward():
        raise RuntimeError("CUDA out of memory")
    with pytest.raises(ValueError), fla_gated_backward():
        raise ValueError("#640")

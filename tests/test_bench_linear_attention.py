"""scripts/bench_linear_attention.py's option sweeps: which JAX rows a command line asks for (no GPU needed)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "scripts" / "bench_linear_attention.py"
    spec = importlib.util.spec_from_file_location("bench_linear_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(bench, op, *argv):
    args = bench.build_parser().parse_args(list(argv))
    return bench.variants(op, args.impl.split(","), args)


def test_no_sweep_gives_one_row_per_impl(bench):
    assert rows(bench, "chunk_gla") == [("xla", "xla", {}), ("pallas", "pallas", {})]
    assert rows(bench, "gla", "--state-block", "32,64") == [("xla", "xla", {}), ("pallas", "pallas", {})]  # layers


def test_sweeps_cross_on_pallas_only(bench):
    got = rows(bench, "chunk_gla", "--state-block", "none,32")
    assert got == [("xla", "xla", {}), ("pallas", "pallas sb=none", {"state_block": None}),
                   ("pallas", "pallas sb=32", {"state_block": 32})]
    got = rows(bench, "chunk_delta_rule", "--impl", "pallas", "--delta-inverse", "pallas,trsm", "--delta-block-v", "16")
    assert got == [("pallas", "pallas inv=pallas bv=16", {"tril_inverse": "pallas", "block_v": 16}),
                   ("pallas", "pallas inv=trsm bv=16", {"tril_inverse": "trsm", "block_v": 16})]


def test_removed_sweeps_are_gone(bench):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--key-group", "32"])

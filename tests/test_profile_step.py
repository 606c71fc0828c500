"""scripts/profile_step.py's trace reading: kernels and synchronisations from a torch.profiler-format trace, and
the per-step split of a synchronised step into host latency, kernel span and tail (synthetic traces, CPU)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profile_step():
    sys.path.insert(0, str(ROOT / "scripts"))  # profile_step imports bench_train as a sibling
    import profile_step

    yield profile_step
    sys.path.remove(str(ROOT / "scripts"))


def test_step_latencies_split_each_synchronised_step(profile_step, tmp_path):
    # two steps after the first sync: kernels at [1100, 1400] and [2300, 2700] us, syncs end at 1000, 2000, 3000
    events = [
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 900, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1100, "dur": 200},
        {"ph": "X", "cat": "kernel", "name": "add", "ts": 1300, "dur": 100},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 1400, "dur": 600},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 2300, "dur": 400},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 2250, "dur": 10},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 2700, "dur": 300},
    ]
    (tmp_path / "torch_trace.json").write_text(json.dumps({"traceEvents": events}))
    kernels, syncs = profile_step.trace_events(tmp_path, torch=True)
    assert [k[0] for k in kernels] == ["gemm", "add", "gemm"] and syncs == [1000, 2000, 3000]
    got = profile_step.step_latencies(kernels, syncs)
    assert got == [pytest.approx((0.1, 0.3, 0.6)), pytest.approx((0.3, 0.4, 0.3))]

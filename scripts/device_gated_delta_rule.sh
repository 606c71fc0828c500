#!/usr/bin/env bash
# Device calls for the gated delta rule's Pallas path (jaxgpt/ops/gated_delta_rule/pallas.py). Run through the
# device tool from the repo root, carrying .whl (FLA 0.6.0's wheels) and .triton-autotune (FLA's autotuning results):
#   bash scripts/device_gated_delta_rule.sh all [PARITY_S] [BENCH_S]   both below in one call, each cut at its timeout
#                                                     (default 270 s and 170 s)
#   bash scripts/device_gated_delta_rule.sh parity    Triton lowering checks, bf16 parity against FLA (-m gpu)
#   bash scripts/device_gated_delta_rule.sh bench [OPS] [SHAPES] [BENCH ARGS...]   fwd+bwd side by side against FLA
#                                                     and GPU kernel time per call by kernel
# Logs (and bench.json) land in $OUT. FLA autotunes each (heads, head dims) for a minute or two on a fresh machine
# (parity and bench share the shapes, so the second pays nothing); copy $OUT/triton-autotune.tgz to
# .triton-autotune/ to skip that on the next machine.
set -uo pipefail
source scripts/device_env.sh
parity() {
    python3 -c 'import jax, torch, triton; print("jax", jax.__version__, "torch", torch.__version__, "triton",
triton.__version__, jax.devices(), torch.cuda.get_device_name(0))' 2>&1 | tee "$OUT/env.log"
    # on the GPU itself: JAX 0.11's abstract-mesh export (what the CPU run uses) fails on the kernels' reductions
    JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider parity_tests/test_fast_gated_delta_rule.py \
      -k lowers 2>&1 | tee "$OUT/lowering.log"
    timeout "$1" python3 -m pytest -q -s -m gpu -p no:cacheprovider parity_tests/test_fast_gated_delta_rule.py 2>&1 \
      | tee "$OUT/gpu_parity.log"
}
bench() {  # timeout, ops, shapes, extra arguments
    timeout "$1" python3 scripts/bench_linear_attention.py --ops "${2:-chunk_gated_delta_rule}" \
      --shapes "${3:-op1,op2,op3}" --impl pallas --reps 10 --out "$OUT/bench.json" --profile /tmp/prof "${@:4}" 2>&1 \
      | tee "$OUT/bench.log"
}
case "${1:-}" in
  all) parity "${2:-270}"; bench "${3:-170}" ;;
  parity) parity 420 ;;
  bench) bench 540 "${@:2}" ;;
  *) echo "usage: bash scripts/device_gated_delta_rule.sh all | parity | bench [OPS] [SHAPES] [ARGS...]"; exit 2 ;;
esac
save_triton_autotune

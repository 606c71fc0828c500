#!/usr/bin/env bash
# Device calls for one linear-attention op family's Pallas path: its Triton lowering checks and bf16 GPU parity
# against FLA (pytest -m gpu), and its fwd+bwd timings side by side with FLA's ops. Run through the device tool from
# the repo root, carrying .whl (FLA 0.6.0's wheels) and .triton-autotune (FLA's autotuning results):
#   bash scripts/device_linear_ops.sh FAMILY all [PARITY_S] [BENCH_S]   both below in one call, each cut at its
#                                                                       timeout (default 270 s and 170 s)
#   bash scripts/device_linear_ops.sh FAMILY parity [PYTEST -k EXPR]
#   bash scripts/device_linear_ops.sh FAMILY bench [OPS] [SHAPES] [BENCH ARGS...]
# FAMILY: gla, delta_rule, gated_delta_rule or simple_gla (retention and linear attention included). Logs (and
# bench.json) land in $OUT. FLA autotunes each (heads, head dims) for a minute or two on a fresh machine (parity and
# bench share the shapes, so the second pays nothing); copy $OUT/triton-autotune.tgz to .triton-autotune/ to skip
# that on the next machine.
set -uo pipefail
case "${1:-}" in  # the family's parity test file, its ops in scripts/bench_linear_attention.py, and their shapes
  gla) TESTS=parity_tests/test_fast_gla.py OPS=chunk_gla SHAPES=op1,op2,op3 ;;
  delta_rule) TESTS=parity_tests/test_fast_delta_rule.py OPS=chunk_delta_rule SHAPES=op1,op2,op3 ;;
  gated_delta_rule) TESTS=parity_tests/test_fast_gated_delta_rule.py OPS=chunk_gated_delta_rule SHAPES=op1,op2,op3 ;;
  simple_gla) TESTS=parity_tests/test_simple_gla.py OPS=chunk_simple_gla,chunk_retention,chunk_linear_attn SHAPES=op1,op2 ;;
  *) echo "usage: bash scripts/device_linear_ops.sh gla|delta_rule|gated_delta_rule|simple_gla all|parity|bench ..."
     exit 2 ;;
esac
case "${2:-}" in all|parity|bench) ;; *)
  echo "usage: bash scripts/device_linear_ops.sh $1 all | parity [K_EXPR] | bench [OPS] [SHAPES] [ARGS...]"; exit 2 ;;
esac
source scripts/device_env.sh
parity() {  # timeout, pytest -k expression
    python3 -c 'import jax, torch, triton; print("jax", jax.__version__, "torch", torch.__version__, "triton",
triton.__version__, jax.devices(), torch.cuda.get_device_name(0))' 2>&1 | tee "$OUT/env.log"
    # on the GPU itself: JAX 0.11's abstract-mesh export (what the CPU run uses) fails on the kernels' reductions
    JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider "$TESTS" -k lowers 2>&1 \
      | tee "$OUT/lowering.log"
    timeout "$1" python3 -m pytest -q -s -m gpu -p no:cacheprovider "$TESTS" ${2:+-k "$2"} 2>&1 \
      | tee "$OUT/gpu_parity.log"
}
bench() {  # timeout, ops, shapes, extra arguments
    timeout "$1" python3 scripts/bench_linear_attention.py --ops "${2:-$OPS}" --shapes "${3:-$SHAPES}" --impl pallas \
      --reps 10 --out "$OUT/bench.json" --profile /tmp/prof "${@:4}" 2>&1 | tee "$OUT/bench.log"
}
case "${2:-}" in
  all) parity "${3:-270}"; bench "${4:-170}" ;;
  parity) parity 420 "${3:-}" ;;
  bench) bench 540 "${@:3}" ;;
esac
save_triton_autotune

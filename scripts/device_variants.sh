#!/usr/bin/env bash
# Device call: bf16 GPU parity for the given pytest -k filter, then a same-seed comparison of the given
# presets at gpt2-124m on the default corpus. Results come back as two tarballs in $OUT.
#   bash scripts/device_variants.sh "PYTEST_K_EXPR" "variant1,variant2,..." [compare timeout s] [iters] [pytest timeout s]
set -uo pipefail
source scripts/device_env.sh
mkdir -p "$OUT/parity" "$OUT/cmp"
if [ -n "$1" ]; then
  OUT="$OUT/parity" timeout "${5:-400}" python3 -m pytest -q -m gpu parity_tests -k "$1" -p no:cacheprovider 2>&1 | tail -60 | tee "$OUT/parity.log"
fi
if [ -n "$2" ]; then
  timeout "${3:-420}" python3 scripts/compare_variants.py --variants "$2" --out "$OUT/cmp" --config gpt2-124m \
    --data data/shakespeare --max-iters "${4:-600}" --set batch_size=8 --set grad_accum=1 --set warmup_iters=100 \
    --set eval_interval=100 --set eval_iters=20 --set log_interval=50 --set ckpt_interval=600 2>&1 \
    | grep -v "^step" | tee "$OUT/compare.log"
fi
tar czf "$OUT/parity.tgz" -C "$OUT" parity && tar czf "$OUT/cmp.tgz" -C "$OUT" cmp && rm -rf "$OUT/parity" "$OUT/cmp"
save_triton_autotune

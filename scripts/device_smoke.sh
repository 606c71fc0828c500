#!/usr/bin/env bash
# One device call that checks a GPU machine end to end: versions, bf16 GPU parity, gpt2-124m for 300 steps on the
# default corpus. Run through the device tool from the repo root, carrying data/shakespeare:
#   bash scripts/device_smoke.sh        (results land in $OUT)
set -uo pipefail
source scripts/device_env.sh
python3 - <<'PY' 2>&1 | tee "$OUT/env.log"
import jax, flax, optax, orbax.checkpoint as ocp, torch, tiktoken
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", ocp.__version__,
      "torch", torch.__version__, "tiktoken", tiktoken.__version__)
print(jax.devices(), torch.cuda.get_device_name(0))
PY
python3 -m pytest -q -m gpu parity_tests -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_parity.log"
python3 -m jaxgpt.train --config gpt2-124m --max-iters 300 --data data/shakespeare --out /tmp/r124 \
  --set eval_interval=100 --set eval_iters=20 2>&1 | tee "$OUT/train_gpt2-124m.log"
cp /tmp/r124/metrics.jsonl "$OUT/metrics_gpt2-124m.jsonl"; cp /tmp/r124/loss.png "$OUT/loss_gpt2-124m.png"

# Source at the start of a command on a GPU machine, from the repo root:
#     source scripts/device_env.sh && python3 ... ; save_triton_autotune
# - installs the carried wheels (.whl/: FLA, lm-eval, ...) into /tmp/site, puts the repo and them on PYTHONPATH;
# - lets JAX and PyTorch share the GPU (no JAX preallocation) and unbuffers Python's output;
# - keeps JAX's compiled programs in /tmp/jax-cache, which a warm machine keeps between calls;
# - keeps Triton's cache in /tmp/triton-cache, seeded from the carried .triton-autotune/triton-autotune.tgz:
#   FLA's autotuning results from earlier calls (*.autotune.json, a few KB; the same Triton and GPU kind hit
#   them), so FLA compiles only the chosen config instead of benchmarking every one (minutes per kernel family
#   on a fresh machine). save_triton_autotune writes this machine's results to $OUT/triton-autotune.tgz; copy
#   that file into .triton-autotune/ here for the next call.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TRITON_CACHE_DIR=/tmp/triton-cache
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache  # compiled programs, for the next call on the same warm machine
OUT=${OUT:-/tmp/jaxgpt-out}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -f .triton-autotune/triton-autotune.tgz ]; then
  tar xzf .triton-autotune/triton-autotune.tgz -C "$TRITON_CACHE_DIR"
  echo "triton autotune cache: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) results restored"
fi

save_triton_autotune() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar czf "$OUT/triton-autotune.tgz" --null -T -)
  echo "triton autotune cache: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) results in $OUT/triton-autotune.tgz"
}

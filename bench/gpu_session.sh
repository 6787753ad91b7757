#!/usr/bin/env bash
# The whole GPU session in one command: a lent GPU machine has minutes, not hours,
# so this installs what is missing, checks the fast paths numerically on the GPU,
# then runs the benchmark table under a time budget (most important rows first).
#
#   OUT=/some/dir BUDGET_S=560 bash bench/gpu_session.sh
#
# Writes to $OUT: env.txt (nvidia-smi, versions), gpu_checks.json/.log
# (bench/gpu_checks.py), RESULTS_gpu.md + results_gpu.json (bench/run.py; a
# run stopped early leaves results_gpu.json.partial, rendered with
# `python bench/run.py --preset gpu --from-json FILE --out RESULTS.md`), bench.log.
# Python packages the machine lacks travel as wheels in .whl/ (see bench/README.md).
# PRESET=gpu_dry FAST=blocked dry-runs the same steps on a CPU.
set -u
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-560}
PRESET=${PRESET:-gpu}
FAST=${FAST:-cudnn}
T0=$(date +%s)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ldm_jax_site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/ldm_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  $PY -c "import sys, jax, jaxlib, flax, optax, torch, diffusers, transformers, numpy
print(sys.version)
for m in (jax, jaxlib, flax, optax, torch, diffusers, transformers, numpy): print(m.__name__, m.__version__)
print('jax devices', jax.devices()); print('torch cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== fast-path checks ($(( $(date +%s) - T0 )) s)"
timeout 150 $PY bench/gpu_checks.py --fast "$FAST" --out "$OUT/gpu_checks.json" > "$OUT/gpu_checks.log" 2>&1
echo "gpu_checks exit $?"; tail -c 3000 "$OUT/gpu_checks.log"

REMAIN=$(( BUDGET_S - ($(date +%s) - T0) ))
echo "== benchmark table, budget ${REMAIN} s"
$PY bench/run.py --preset "$PRESET" --budget-s "$REMAIN" --timeout 240 --attention-variants '' \
  --only unet_fwd,txt2img,train_step,first_image,vae_decode \
  --out "$OUT/RESULTS_$PRESET.md" --workdir /tmp/ldm_jax_bench > "$OUT/bench.log" 2>&1
echo "bench exit $? after $(( $(date +%s) - T0 )) s"
grep -v "^environment" "$OUT/bench.log" | tail -c 6000

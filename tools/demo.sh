#!/usr/bin/env bash
# The main job on the built-in emoji dataset, no downloads: train the first-stage
# autoencoder, train a text-to-image LDM on its latents, sample a grid of prompts.
# About 16 minutes on 2 idle CPU cores (AE 5.5 min, LDM 9.7 min, sampling 20 s); see README.
# Knobs (environment): WORK (output folder), AE_STEPS, LDM_STEPS, SAMPLE_STEPS, PROMPTS (a file,
# one prompt per line). Rerunning resumes / skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-workdir/demo}
AE_STEPS=${AE_STEPS:-}
LDM_STEPS=${LDM_STEPS:-}
SAMPLE_STEPS=${SAMPLE_STEPS:-25}
PROMPTS=${PROMPTS:-tools/demo_prompts.txt}
mkdir -p "$WORK"
# Short runs (smoke tests): no warm-up, so the schedules stay valid below 100 steps.
AE_WARMUP=(); LDM_WARMUP=()
if [[ -n "$AE_STEPS" && "$AE_STEPS" -le 100 ]]; then AE_WARMUP=(--config.train.warmup_steps=0); fi
if [[ -n "$LDM_STEPS" && "$LDM_STEPS" -le 200 ]]; then LDM_WARMUP=(--config.train.warmup_steps=0); fi

echo "== 1/3 first stage: KL autoencoder on emoji ($WORK/autoencoder)"
python train.py --config configs/emoji_autoencoder.py --workdir "$WORK/autoencoder" \
    ${AE_STEPS:+--config.train.num_steps=$AE_STEPS} "${AE_WARMUP[@]}"

echo "== 2/3 text-to-image LDM on the autoencoder's latents ($WORK/ldm)"
python train.py --config configs/emoji_ldm.py:demo --workdir "$WORK/ldm" \
    --config.first_stage.checkpoint="$WORK/autoencoder" \
    ${LDM_STEPS:+--config.train.num_steps=$LDM_STEPS} "${LDM_WARMUP[@]}"

echo "== 3/3 sampling"
python sample.py --checkpoint "$WORK/ldm" --from-file "$PROMPTS" --n_samples 4 \
    --steps "$SAMPLE_STEPS" --sampler ddim --scale 4 --seed 0 --outdir "$WORK/samples"
echo "done: the images are in $WORK/samples/samples/ and the grid is $WORK/samples/grid.png"

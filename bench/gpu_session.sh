#!/usr/bin/env bash
# The open GPU measurements of bench/gpu.py in one call of at most ~9.5 minutes, in priority order, each section
# under its own --budget-s (a section that would overrun is skipped and says so in its JSON's notes):
#   1. eager training step, NCHW beside channels_last and the +lpnorm / +cudnn probes, with operator profiles;
#   2. compiled inference at batch 8 beside diffusers, and the VAE decode with transposed upsampling;
#   3. the training step under whole-model torch.compile, ours (NCHW) and diffusers.
# Usage: bash bench/gpu_session.sh [RESULTS_DIR [EXTRA_ARGS...]]   (default bench/results; on a device machine pass
# "$OUT"; EXTRA_ARGS go to every gpu.py call: `bash bench/gpu_session.sh /tmp/g --tiny` checks the script on a CPU).
# PYTHON picks the interpreter (default python3). Wheels in .whl/ (diffusers and importlib_metadata, see
# bench/README.md) are installed first when present.
set -u
python=${PYTHON:-python3}
results=${1:-bench/results}
mkdir -p "$results"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" bench/gpu.py --skip inference vae compiled --budget-s 190 --train-profile \
    --train-impls ours+fuse diffusers ours+switches ours+fuse+lpnorm ours+fuse+cudnn \
    --out "$results/gpu_train.json" "${@:2}"
"$python" bench/gpu.py --skip inference training --compiled full --compiled-batches 8 --budget-s 170 \
    --out "$results/gpu_compiled8.json" "${@:2}"
"$python" bench/gpu.py --skip inference vae compiled --train-compile --train-impls ours+fuse diffusers --budget-s 190 \
    --out "$results/gpu_train_compile.json" "${@:2}"

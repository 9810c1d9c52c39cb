#!/usr/bin/env bash
# The open GPU measurements of bench/gpu.py in one call, in priority order, inside one wall-clock limit
# (GPU_SESSION_S, default 560 s: a device call allows 600). Each section gets the time left, capped, as its
# --budget-s and runs under `timeout`; gpu.py rewrites its JSON after every row, so a section cut short keeps its
# rows, and everything printed goes to RESULTS_DIR/session.log as well.
#   1. eager training step: NCHW beside channels_last, diffusers, and the +lpnorm / +flash probes, with operator
#      profiles and the device time by kind (convolution, matmul, attention, norm, ...);
#   2. compiled inference at batch 8, ours beside diffusers, and the VAE decode with transposed upsampling;
#   3. the training step under whole-model torch.compile, ours (NCHW) then diffusers, with the time left.
# Usage: bash bench/gpu_session.sh [RESULTS_DIR [EXTRA_ARGS...]]   (default bench/results; on a device machine pass
# "$OUT"; EXTRA_ARGS go to every gpu.py call: `bash bench/gpu_session.sh /tmp/g --tiny` checks the script on a CPU).
# PYTHON picks the interpreter (default python3). Wheels in .whl/ (diffusers and importlib_metadata, see
# bench/README.md) are installed first when present.
set -u
python=${PYTHON:-python3}
results=${1:-bench/results}
extra=("${@:2}")
total=${GPU_SESSION_S:-560}
start=$SECONDS
mkdir -p "$results"
exec > >(tee -a "$results/session.log") 2>&1
tee_pid=$!
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$python" -c "import diffusers, PIL; print('diffusers', diffusers.__version__)" || echo "diffusers does not import"

# run CAP ARGS...: gpu.py with --budget-s = the time left (15 s kept for the end), at most CAP
run() {
    local cap=$1 budget
    shift
    budget=$(( total - (SECONDS - start) - 15 ))
    (( budget > cap )) && budget=$cap
    if (( budget < 45 )); then
        echo "skipped, ${budget} s left: $*"
        return
    fi
    echo "== gpu.py --budget-s $budget $* (at ${SECONDS} s)"
    timeout -k 5 $(( budget + 20 )) "$python" bench/gpu.py --budget-s "$budget" "$@" "${extra[@]}" \
        || echo "gpu.py exited with status $?"
}

run 130 --skip inference vae compiled --train-profile --no-train-checkpointing \
    --train-impls ours+fuse diffusers ours+switches ours+fuse+lpnorm ours+fuse+flash --out "$results/gpu_train.json"
run 190 --skip inference training --compiled full --compiled-batches 8 --compile-gate-s 75 \
    --out "$results/gpu_compiled8.json"
run 1000 --skip inference vae compiled --train-compile --no-train-checkpointing --compile-gate-s 60 \
    --train-impls ours+fuse diffusers --out "$results/gpu_train_compile.json"
echo "== done at ${SECONDS} s"
exec >&- 2>&-  # let tee write the log's last lines before the call collects it
wait "$tee_pid" 2>/dev/null || true

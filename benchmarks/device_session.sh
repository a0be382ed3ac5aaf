#!/usr/bin/env bash
# The GPU measurements of one lent device session (issues 15 and 18), as one script, in the repository
# root of the device machine. Prepared here (no GPU needed):
#   python benchmarks/experiments/device_data.py pack .gpu/embedded.pack.npz   # the data, 32 MB
#   pip download ... -d .whl astropy pyerfa astropy-iers-data GaiaXPy aenum fastavro hdfs isal (cp312)
# then run with `.whl` and `.gpu` carried; OUT is where results go (the device tool's $OUT).
# 1. benchmarks/gpu_speed.py: inference stars/s, training samples/s (default and ~10x configs), end to end.
# 2. benchmarks/gpu_scaling.py: the 3 sizes x 3 budgets grid and the task-mix screens, on validation.
set -u
OUT=${OUT:-benchmarks/results}
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/experiments/device_data.py unpack .gpu/embedded.pack.npz || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, stellarlm.survey, stellarlm.training; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    || exit 1
timeout "${SPEED_SECONDS:-200}" python3 benchmarks/gpu_speed.py --seconds 2 --e2e-rows "${E2E_ROWS:-100000}" \
    --parse-threads 12 --out "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.log"
echo "speed done after $(( $(date +%s) - start )) s"
timeout "${SCALING_SECONDS:-360}" python3 benchmarks/gpu_scaling.py --minutes "${SCALING_MINUTES:-5}" \
    --out "$OUT/gpu_scaling.json" 2>&1 | tee "$OUT/gpu_scaling.log"
echo "all done after $(( $(date +%s) - start )) s"

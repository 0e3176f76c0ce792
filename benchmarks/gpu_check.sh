#!/usr/bin/env bash
# The GPU check, one script for one lent GPU machine (an NVIDIA H200 is the one planned for).
#
#   bash benchmarks/gpu_wheels.sh            # here, once: the wheels the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_check.sh             # there, with .whl/ carried along
#   KDKIT_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --quick   # a dry run on a CPU machine
#
# It assumes torch, torchvision, timm, accelerate, einops and safetensors, and what a lent H200
# machine has beside them (numpy, pillow, matplotlib, scikit-learn, scipy, pytest, tqdm);
# kornia, which that machine lacks, travels as wheels in .whl/. It runs the suite's device tests on the device, then
# benchmarks/gpu_check.py (model steps, input pipeline, time waiting for data, GPU memory, a
# short --preset paper run through accelerate launch) and writes gpu_check_<device>.json/.md
# to $OUT (the device tool's folder) or benchmarks/results/. Any error stops it, non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${KDKIT_GPU_CHECK_DEVICE:-cuda}"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    site="$(mktemp -d)/site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$python" - "$device" <<'PY'
import sys, torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: CUDA is not available here; KDKIT_GPU_CHECK_DEVICE=cpu runs the dry run")
import kornia, kdkit  # noqa: F401  (fails here, not minutes in, when a wheel is missing)
print(f"gpu_check: torch {torch.__version__}, device {device}"
      + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""))
PY

echo "== device tests on $device"
KDKIT_TEST_DEVICE="$device" timeout 60 "$python" -m pytest -q -p no:cacheprovider tests/test_devices.py

echo "== measurements and a short --preset paper run"
timeout 230 "$python" benchmarks/gpu_check.py --device "$device" "$@"

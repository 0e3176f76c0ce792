#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the wheels that benchmarks/gpu_check.sh needs and a lent
# GPU machine lacks (its Python is 3.12 on x86-64): kornia and its Rust core. About 7 MB; the
# device tool carries .whl/ when asked to (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl kornia==0.9.0 kornia_rs==0.2.0  # the versions tested here
ls .whl

#!/usr/bin/env bash
# The GPU path in one script (at most ~8 minutes on one H100/H200), run from the repo root:
#
#   bash bench/gpu_check.sh            # all checks; exits non-zero when one fails
#
# It needs a CUDA build of torch and the project's dependencies. On a machine with internet:
# `make install TORCH_SPEC=torch` (or `pip install -e .` into an environment with CUDA torch).
# On a machine without internet, carry wheels in .whl/ (Python 3.12, built for x86-64 Linux) and
# the DeepSpeed source tarball: this script installs them into /tmp/site first, e.g. prepared with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl webdataset pydantic pydantic-core omegaconf antlr4-python3-runtime datasets ftfy ...
#   pip download --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
# (DeepSpeed is built with DS_BUILD_OPS=0: its ops compile just in time with the local CUDA compiler.)
#
# Checks, one line each (bench/gpu_check.py): same initial weights on CPU and GPU; forward and
# backward of the 1.3B layer shape on CPU fp32 vs GPU fp32 vs GPU bf16 with the flash SDPA kernel;
# document attention (FlexAttention block mask): a packed row equals each document alone, and its
# tokens/s against causal attention at 2048 tokens in 8 documents;
# 16 launcher steps on GPU vs CPU (fp32) and bf16 vs fp32; save at step 8 and resume; tokens/s,
# MFU, peak memory and time to the first step of the 1.3B shape for 30 steps with compile on and
# the chunked loss (the recipe), compile off, and the full fp32 logits, beside the --dry-run plan.
# Under the 15-minute device budget: `bash bench/gpu_check.sh --speed-steps 20 --speed-variants 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ -d .whl ]] && ! "$PY" -c "import deepspeed, webdataset" 2>/dev/null; then
    echo "INFO installing the carried wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if ! "$PY" -c "import deepspeed" 2>/dev/null; then
        DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
    fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
unset DS_ACCELERATOR
exec "$PY" bench/gpu_check.py all --out "$OUT" "$@"

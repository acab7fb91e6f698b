#!/usr/bin/env bash
# Stage the wheels the GPU machine lacks into .whl/ (git-ignored), from this machine, which can
# reach the package registries (the GPU machine cannot). Then every device call carries .whl and
# starts with `source .whl/activate`.
#
#     bash bench/stage_wheels.sh [SHARED_STAGE]     # SHARED_STAGE: ../shared/device/stage.sh
#
# The shared set (fla, mamba_ssm, liger-kernel, deepspeed, ...) comes from the workplace's
# stage script; nvidia-cudnn-frontend (cuDNN's banded attention, braid's sliding-window backend
# on Hopper) is not in it and is downloaded here for the image's Python 3.12. Without it the
# windows fall back to FlexAttention, which in a whole-step compile also splits the graph at each
# window layer (its block-mask lookup runs outside the graph): in an H200 step of hybrid-374m the
# flex windows took 7.8 ms, against about 6.2 on cuDNN (8 x 0.77 ms, seventh measurement), plus
# 8 eager gradient adds of 0.047 ms (docs/benchmarks.md, thirteenth measurement).
# bench/throughput.py prints which backends load, so a missing one shows in every log.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
stage="${1:-$root/../shared/device/stage.sh}"
cd "$root"
bash "$stage"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    nvidia-cudnn-frontend==1.32.0 -d .whl
ls .whl

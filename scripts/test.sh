#!/usr/bin/env bash
# The whole test suite on a fresh machine: the README's test command, and what .ci/run calls.
# Creates .venv (unless a virtual environment is already active), installs the pack with its test,
# peer, realtime, ray and pipecat extras and Debian's chromium (the live-page browser test), then runs ruff, the layer
# check and pytest; then the real-ComfyUI tests (tests/comfy) in ComfyUI's own environment, which
# scripts/setup_comfy.sh builds once into .comfy/. Safe to re-run: every step is skipped when already done.
# Arguments go to the main pytest run; LIVECACHE_COMFY_TESTS=0 leaves the ComfyUI suite out of a local run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# torch: keep whatever the environment has (a GPU user's CUDA build); otherwise the CPU build.
python -c "import torch" 2>/dev/null || quiet pip install -q "torch==2.13.0"
quiet pip install -q -e ".[test,peers,realtime,ray,pipecat]"
python -c "import torch, livecache; print('torch', torch.__version__)"

# Debian's chromium (playwright drives it; never `playwright install`) and espeak-ng (the avatar's teacher speech).
need_debian_package chromium chromium "the live-runtime browser test needs it"
need_debian_package espeak-ng espeak-ng "the avatar training test needs it"

ruff check .
if [ -f ../shared/tools/check_layers.py ]; then python ../shared/tools/check_layers.py .; fi
python -m pytest "$@"

if [ "${LIVECACHE_COMFY_TESTS:-1}" != 0 ]; then
  bash scripts/setup_comfy.sh
  # -P: ComfyUI's top-level `nodes` module must not be shadowed by this repository's nodes/ package
  LIVECACHE_COMFY_ROOT="$PWD/.comfy/ComfyUI" .comfy/venv/bin/python -P -m pytest tests/comfy
fi

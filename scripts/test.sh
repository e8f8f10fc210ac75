#!/usr/bin/env bash
# The whole test suite on a fresh machine: the README's test command, and what .ci/run calls.
# Creates .venv (unless a virtual environment is already active), installs the pack with its test,
# peer and realtime extras and Debian's chromium (the live-page browser test), then runs ruff, the layer
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
# Run a noisy install quietly, but show everything it said if it fails.
quiet() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  rm -f "$log"
}

# torch: keep whatever the environment has (a GPU user's CUDA build); otherwise the CPU build.
python -c "import torch" 2>/dev/null || quiet pip install -q "torch==2.13.0"
quiet pip install -q -e ".[test,peers,realtime]"
python -c "import torch, livecache; print('torch', torch.__version__)"

# Debian's chromium for the live-runtime browser test (playwright drives it; never `playwright install`).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "missing chromium: install it with apt-get (the browser test needs it)" >&2
    exit 1
  fi
fi

# Debian's espeak-ng: the diffusion avatar's training test synthesises its teacher's speech with it.
if ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "missing espeak-ng: install it with apt-get (the avatar training test needs it)" >&2
    exit 1
  fi
fi

ruff check .
if [ -f ../shared/tools/check_layers.py ]; then python ../shared/tools/check_layers.py .; fi
python -m pytest "$@"

if [ "${LIVECACHE_COMFY_TESTS:-1}" != 0 ]; then
  bash scripts/setup_comfy.sh
  # -P: ComfyUI's top-level `nodes` module must not be shadowed by this repository's nodes/ package
  LIVECACHE_COMFY_ROOT="$PWD/.comfy/ComfyUI" .comfy/venv/bin/python -P -m pytest tests/comfy
fi

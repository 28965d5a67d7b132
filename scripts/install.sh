#!/usr/bin/env bash
# Creates .venv with editrl and everything its tests need, on a CPU-only machine.
# torch comes first from the local CPU wheel; the constraint keeps any later install from
# replacing it with a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[judge,dev]"

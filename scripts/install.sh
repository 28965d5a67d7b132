#!/usr/bin/env bash
# Creates .venv with editrl and everything its tests need, on a CPU-only machine.
# torch comes first from the local CPU wheel; the constraint keeps any later install from
# replacing it with a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
# DS_BUILD_OPS=0: DeepSpeed installs without compiling its C++/CUDA ops (about 20 s here); editrl needs none.
DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[judge,iqa,deepspeed,dev]"
# CPU-only workaround: pyiqa pulls the registry's torchvision, a CUDA build whose two unguarded fake-op
# registrations break `import torchvision` (and so transformers' image processors) against CPU torch.
.venv/bin/python scripts/guard_torchvision.py

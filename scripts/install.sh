#!/usr/bin/env bash
# Creates .venv with editrl and everything its tests need, at the versions of locks/main.txt.
#
#   bash scripts/install.sh             CPU (the default): the CPU build of torch, then exactly the lock
#   bash scripts/install.sh --cuda      a GPU machine: keeps the CUDA torch that $PYTHON already has
#   bash scripts/install.sh --unlocked  resolve the newest versions instead of the lock (scripts/lock.sh uses it)
#
# PYTHON (default python3) is the interpreter the environment is made from; EDITRL_VENV (default .venv) its folder.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash scripts/install.sh [--cuda] [--unlocked]   (env: PYTHON=python3 EDITRL_VENV=.venv)"; }
source scripts/options.sh "$@"
PY=${PYTHON:-python3}
VENV=${EDITRL_VENV:-.venv}
LOCK=locks/main.txt
EXTRAS="judge,iqa,deepspeed,wandb,dev"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# DS_BUILD_OPS=0: DeepSpeed installs without compiling its C++/CUDA ops (about 20 s here); editrl needs none.
export DS_BUILD_OPS=0

if [ "$CUDA" = 1 ]; then
    # The user's CUDA torch stays: the environment sees $PYTHON's packages, torch (and torchvision, if there) are
    # pinned to what is installed, and the lock pins everything else. The lock was resolved against torch 2.13; with
    # a much older torch a locked package may not fit it: then add --unlocked.
    torch=$("$PY" -c 'import torch; print(torch.__version__ if torch.version.cuda else "cpu")' 2>/dev/null) || {
        echo "install.sh --cuda: $PY has no torch; install the CUDA build of torch first (pytorch.org), or drop --cuda" >&2
        exit 2
    }
    if [ "$torch" = cpu ]; then
        echo "install.sh --cuda: the torch of $PY is a CPU build; install a CUDA build first (pytorch.org), or drop --cuda" >&2
        exit 2
    fi
    [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null || {
        echo "install.sh --cuda: $VENV does not see the CUDA torch of $PY (a CPU install?); remove $VENV and run again" >&2
        exit 2
    }
    pins="$VENV/editrl-cuda-pins.txt"
    "$VENV/bin/python" - "$LOCKED" "$LOCK" > "$pins" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version

# torch and the packages built against it come from the user's install, never from the (CPU) lock.
OWN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-[\w.-]+)==", re.I)
for name in ("torch", "torchvision", "torchaudio"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
if sys.argv[1] == "1":
    print("".join(line for line in open(sys.argv[2]) if line.strip() and not line.startswith("#") and not OWN.match(line)), end="")
EOF
    "${PIP[@]}" -c "$pins" -e ".[$EXTRAS]"
    echo "$VENV: editrl with torch $torch (CUDA $("$VENV/bin/python" -c 'import torch; print(torch.version.cuda)'))"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first, from the local CPU wheel; constraints.txt keeps any later install from replacing it with a multi-GB
# CUDA build.
"${PIP[@]}" torch==2.13.0
if [ "$LOCKED" = 1 ]; then
    # Exactly the lock (every package at its pinned version, nothing resolved anew), then editrl itself.
    "${PIP[@]}" --no-deps -c constraints.txt -r "$LOCK"
    "${PIP[@]}" --no-deps -e .
else
    "${PIP[@]}" -c constraints.txt -e ".[$EXTRAS]"
fi
# CPU-only workaround: pyiqa pulls the registry's torchvision, a CUDA build whose two unguarded fake-op
# registrations break `import torchvision` (and so transformers' image processors) against CPU torch.
"$VENV/bin/python" scripts/guard_torchvision.py

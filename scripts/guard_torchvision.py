"""CPU-only workaround, applied by scripts/install.sh and scripts/vllm_env.sh to the environment that runs it.

The registry's torchvision wheel is a CUDA build: its compiled ops do not load against torch's CPU
build, so `torchvision::nms` and `torchvision::qnms` are never defined, and the two unconditional
fake-op registrations in torchvision/_meta_registrations.py raise "operator torchvision::nms does not
exist" at import time -- and with them every import that touches torchvision (transformers' image and
video processors, pyiqa, vLLM's multimodal code). This guards those two registrations the way
torchvision already guards all its others (`torchvision.extension._has_ops()`), so torchvision stays
importable and only its compiled detection ops are missing, which nothing here uses.

Idempotent; does nothing when torchvision is absent or already imports.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARKER = "# editrl: CPU-only guard"
OPS = ("torchvision::nms", "torchvision::qnms")


def imports_cleanly() -> bool:
    """In a fresh interpreter: the current process may already hold a half-imported torchvision."""
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed: nothing to guard")
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER not in text and not imports_cleanly():
        for op in OPS:
            line = f'@torch.library.register_fake("{op}")'
            if line not in text:
                print(f"{path}: expected `{line}` not found; this torchvision needs a different workaround", file=sys.stderr)
                return 1
            guarded = f'@(torch.library.register_fake("{op}") if torchvision.extension._has_ops() else (lambda fn: fn))  {MARKER}'
            text = text.replace(line, guarded)
        path.write_text(text)
        print(f"guarded the torchvision::nms/qnms fake-op registrations in {path}")
    if not imports_cleanly():
        print("torchvision still fails to import after the guard", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

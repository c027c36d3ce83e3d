"""Child processes of the CLI, the demo and the benchmarks: start a worker, stop a child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def start_worker_process() -> subprocess.Popen[bytes]:
    """A real Celery worker as a child process, configured by the same environment."""
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=os.environ.copy())


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Ask a child to shut down cleanly; kill it if it has not within ``timeout`` seconds."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

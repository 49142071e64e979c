"""The real nova, in a virtual environment of its own, behind a JSON-lines worker process.

nova pins dependencies (eventlet, oslo.*, SQLAlchemy ...) that have no place in vm-host's
environment, so the benchmark creates bench/.nova-venv once (git-ignored) with the
interpreter running the benchmark and `pip install nova==34.0.0`, and talks to
bench/nova_worker.py running there.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

NOVA_VERSION = "34.0.0"
BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".nova-venv"
WORKER = BENCH_DIR / "nova_worker.py"
LOG_DIR = BENCH_DIR / ".cache"
_STAMP = VENV_DIR / f".vmhost-bench-nova-{NOVA_VERSION}"


class NovaUnavailableError(RuntimeError):
    """nova could not be installed or started; the message says what failed."""


class NovaTimeoutError(RuntimeError):
    """The worker did not answer in time (it has been killed)."""


def venv_python() -> Path:
    """Path of the nova venv's interpreter."""
    return VENV_DIR / "bin" / "python"


def ensure_venv(log: Any = print) -> Path:
    """Create bench/.nova-venv with nova installed, unless a finished one is there already.

    A stamp file is written only after pip succeeded, so an interrupted install is redone.
    """
    python = venv_python()
    if _STAMP.exists() and python.exists():
        return python
    log(f"creating {VENV_DIR} and installing nova=={NOVA_VERSION} (once; takes a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"nova=={NOVA_VERSION}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise NovaUnavailableError(f"pip install nova=={NOVA_VERSION} failed:\n{tail}")
    _STAMP.write_text(f"nova=={NOVA_VERSION}\n")
    return python


class NovaWorker:
    """One nova worker process; requests are answered in order, one JSON line each."""

    def __init__(self, python: Path, name: str = "nova-worker"):
        LOG_DIR.mkdir(exist_ok=True)
        self._stderr = (LOG_DIR / f"{name}.log").open("w")
        self._proc = subprocess.Popen(
            [str(python), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._answers: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._answers.put(line)
        self._answers.put(None)

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and wait for its answer.

        Raises:
            NovaTimeoutError: no answer within `timeout` seconds; the worker is killed, since
                nova's fitter cannot be interrupted from outside any other way.
            NovaUnavailableError: the worker died or reported an error.
        """
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        try:
            line = self._answers.get(timeout=timeout)
        except queue.Empty:
            self.close(kill=True)
            raise NovaTimeoutError(f"nova did not answer within {timeout} s") from None
        if line is None:
            raise NovaUnavailableError(
                f"nova worker exited (code {self._proc.wait()}); see {self._stderr.name}"
            )
        answer = json.loads(line)
        if not answer.get("ok"):
            raise NovaUnavailableError(f"nova worker error: {answer.get('error')}")
        return answer

    def close(self, kill: bool = False) -> None:
        """Stop the worker (kill it when it is stuck in a computation)."""
        if self._proc.poll() is None:
            if kill:
                self._proc.kill()
            elif self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> NovaWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

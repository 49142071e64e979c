"""A gate in front of libvirtd's socket: a slow network between a client and the real daemon.

Faults that happen *while* a compose runs (the operator undefines a pool, the hook is killed)
need the compose to stand still at a known step. The gate is a unix socket a client reaches
with `qemu+unix:///system?socket=...`; it forwards every byte both ways to libvirtd, reading
the client's RPC frames only to recognise one procedure: the n-th call of it is held (not
forwarded) until the test releases it, or dropped with the connection when the test closes
the gate. Nothing is answered by the gate: every reply is libvirtd's own.

`compose_in_child` runs a compose in a separate process (multiprocessing "spawn": a fresh
interpreter, no inherited connection) so that a test can SIGKILL it, as a hook is killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import struct
import threading
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType

from vmhost.backends.libvirt import LibvirtBackend
from vmhost.model import Placement, VmSpec

LIBVIRTD_SOCKET = "/run/libvirt/libvirt-sock"
REMOTE_PROGRAM = 0x20008086
CALL = 0
# Procedure numbers of libvirt's remote protocol (src/remote/remote_protocol.x); stable forever.
DOMAIN_DEFINE_XML = 11
STORAGE_VOL_CREATE_XML = 93
_HEADER = struct.Struct(">IIIIII")  # program, version, procedure, type, serial, status


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class LibvirtGate:
    """Forward to libvirtd; hold the `nth` call of procedure `hold` until released."""

    def __init__(self, directory: Path, hold: int, nth: int = 1):
        self.path = directory / "gate.sock"
        self.hold = hold
        self.nth = nth
        self.calls: list[int] = []
        """Every procedure clients called through the gate, in order (for failure messages)."""
        self._seen = 0
        self._held = threading.Event()
        self._go = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._threads: list[threading.Thread] = []

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path}"

    def __enter__(self) -> LibvirtGate:
        self.path.unlink(missing_ok=True)
        self._listener.bind(str(self.path))
        self._listener.listen(8)
        self._start(self._accept)
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_held(self, timeout: float) -> bool:
        """Wait until the held call arrived (True), or `timeout` seconds passed (False)."""
        return self._held.wait(timeout)

    def release(self) -> None:
        """Forward the held call: the client goes on."""
        self._go.set()

    def close(self) -> None:
        """Drop every connection; a call still held is never forwarded."""
        with self._lock:
            self._closed = True
            sockets = [self._listener, *self._sockets]
        self._go.set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self.path.unlink(missing_ok=True)

    def _start(self, target, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(LIBVIRTD_SOCKET)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            self._start(self._calls, client, upstream)
            self._start(self._replies, upstream, client)

    def _calls(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client -> libvirtd, frame by frame (a frame starts with its length, 4 bytes)."""
        try:
            while (length := _read_exactly(client, 4)) is not None:
                body = _read_exactly(client, struct.unpack(">I", length)[0] - 4)
                if body is None:
                    break
                program, _version, procedure, kind, _serial, _status = _HEADER.unpack_from(body)
                if program == REMOTE_PROGRAM and kind == CALL:
                    self.calls.append(procedure)
                    if procedure == self.hold:
                        self._seen += 1
                        if self._seen == self.nth:
                            self._held.set()
                            self._go.wait()
                if self._closed:
                    break
                upstream.sendall(length + body)
        except OSError:
            pass
        finally:
            for sock in (upstream, client):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _replies(upstream: socket.socket, client: socket.socket) -> None:
        """Replies, libvirtd to client, byte for byte."""
        try:
            while chunk := upstream.recv(65536):
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _compose(
    uri: str,
    virt_type: str,
    intent_dir: str,
    console_log_dir: str,
    spec: VmSpec,
    placement: Placement,
    pool: str,
) -> None:
    with LibvirtBackend(
        uri=uri, virt_type=virt_type, intent_dir=intent_dir, console_log_dir=console_log_dir
    ) as backend:
        backend.compose(spec, placement, (), pool)


def compose_in_child(
    uri: str, backend: LibvirtBackend, spec: VmSpec, placement: Placement, pool: str
) -> BaseProcess:
    """Start `spec`'s compose in another process, on `uri`, with `backend`'s intents and type."""
    child = multiprocessing.get_context("spawn").Process(
        target=_compose,
        args=(
            uri,
            backend.virt_type,
            str(backend.intents.directory),
            backend.console_log_dir,
            spec,
            placement,
            pool,
        ),
        name=f"compose {spec.name}",
        daemon=True,
    )
    child.start()
    return child

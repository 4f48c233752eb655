"""Start one server in its own uvicorn subprocess, wait until it is ready, and stop it fully.

A server that starts Ray inside its process leaves Ray's own processes (GCS, raylet, workers)
behind if it dies badly. ``running_server`` remembers every process below the uvicorn process
while it runs and kills, by id, whichever of them outlives the graceful shutdown, so the next
server gets the whole machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from policy_server.net import free_port  # the repository root is on sys.path (see bench/serving.py)


@dataclass(frozen=True)
class ServerSpec:
    """How to start one design: a uvicorn app (``module:attr``), its environment and probe."""

    name: str
    app: str
    env: dict[str, str] = field(default_factory=dict)
    factory: bool = False
    ready_path: str = "/"


@dataclass
class RunningServer:
    spec: ServerSpec
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    tree: dict[int, str] = field(default_factory=dict)  # pid -> start time, every process below

    def remember_tree(self) -> None:
        self.tree.update(descendants(self.process.pid))

    def pids(self) -> list[int]:
        """The uvicorn process and every process seen below it (Ray's included)."""
        self.remember_tree()
        return [self.process.pid, *self.tree]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every live process (zombies left out), from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), fields[19])
    return table


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (pid -> start time, which tells a reused pid apart)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = table[child][1]
        todo.extend(children.get(child, []))
    return found


def _alive(pids: dict[int, str]) -> dict[int, str]:
    table = _proc_table()
    return {pid: start for pid, start in pids.items() if pid in table and table[pid][1] == start}


def _command(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        return cmdline.decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(server: RunningServer, timeout_s: float) -> None:
    """Poll ``GET ready_path`` until it answers 200; fail early if the process exits."""
    url = server.base_url + server.spec.ready_path
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.spec.name} exited with {server.process.returncode} while starting; "
                f"log {server.log_path}:\n{_log_tail(server.log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(
        f"{server.spec.name} not ready after {timeout_s:.0f} s ({url}: {last}); "
        f"log {server.log_path}:\n{_log_tail(server.log_path)}"
    )


@contextmanager
def running_server(
    spec: ServerSpec, cwd: Path, log_dir: Path, ready_timeout_s: float = 180.0
) -> Iterator[RunningServer]:
    """Start ``uvicorn <app>`` (one worker) on a free port, yield it once ready, stop it fully."""
    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", spec.app, "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--log-level", "warning", "--no-access-log",
        ] + (["--factory"] if spec.factory else [])

    with running_process(spec, command, cwd, log_dir, ready_timeout_s) as server:
        yield server


@contextmanager
def running_process(
    spec: ServerSpec, command: Callable[[int], list[str]], cwd: Path, log_dir: Path, ready_timeout_s: float = 180.0
) -> Iterator[RunningServer]:
    """Start ``command(port)`` on a free port (log in ``log_dir/<name>.log``), yield it once
    ``GET spec.ready_path`` answers 200, stop it fully (``stop_server``)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command(port), cwd=cwd, env={**os.environ, **spec.env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = RunningServer(spec, f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server, ready_timeout_s)
        server.remember_tree()
        yield server
    finally:
        stop_server(server, port)


def stop_server(server: RunningServer, port: int, grace_s: float = 60.0) -> None:
    """SIGINT to uvicorn (its lifespan shuts Ray down), then SIGKILL to whatever is left.

    SIGINT, not SIGTERM: a process that started Ray aborts on SIGTERM (Ray's native failure
    signal handler replaces uvicorn's), skips the rest of its shutdown and leaves Ray's agents
    running for about a minute. Ctrl-C's signal takes uvicorn's graceful path.
    """
    process = server.process
    if process.poll() is None:
        server.remember_tree()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            print(f"  {server.spec.name}: no exit {grace_s:.0f} s after SIGINT; killing it", file=sys.stderr)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)
    if process.returncode not in (0, -signal.SIGINT, -signal.SIGKILL):
        print(f"  {server.spec.name}: exited with status {process.returncode}; see {server.log_path}",
              file=sys.stderr)
    deadline = time.monotonic() + 20
    while _alive(server.tree) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = _alive(server.tree)
    if left:
        names = ", ".join(f"{pid} {_command(pid)}" for pid in sorted(left))
        print(f"  {server.spec.name}: killing {len(left)} leftover process(es): {names}", file=sys.stderr)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 20
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.25)
    if _port_open(port):
        raise RuntimeError(f"{server.spec.name}: port {port} still open after shutdown")

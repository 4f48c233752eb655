"""Drive ``wrk`` (a native HTTP load generator) with a JSON POST, and parse what it prints.

A Python client would take most of a core by itself on a small machine and end up measuring
itself (httpx with 64 coroutines takes most of a core on 2 cores); ``wrk -t1`` costs far less per request.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_wrk() -> str:
    """The wrk executable, or a SystemExit that says how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(
            "wrk is not installed: the serving benchmark needs it (`apt-get install -y wrk`, "
            "Debian/Ubuntu package `wrk`)"
        )
    return path


def lua_script(body: str | bytes, headers: dict[str, str]) -> str:
    """A wrk script that POSTs ``body`` with ``headers`` on every request (JSON unless ``headers``
    name another ``Content-Type``)."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    for name, value in {"Content-Type": "application/json", **headers}.items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    return "\n".join(lines) + "\n"


def _lua_string(text: str | bytes) -> str:
    """A double-quoted Lua string literal (every byte outside printable ASCII escaped)."""
    out = []
    for byte in text if isinstance(text, bytes) else text.encode():
        char = chr(byte)
        out.append(f"\\{byte:03d}" if char in '"\\' or not 32 <= byte < 127 else char)
    return '"' + "".join(out) + '"'


def run_wrk(
    wrk: str, url: str, body: Any, headers: dict[str, str], connections: int, duration_s: float
) -> WrkResult:
    """One ``wrk -t1 -c<connections>`` run of ``duration_s`` seconds POSTing ``body``: bytes as they
    are (``headers`` give their ``Content-Type``), anything else as JSON."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        text = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":"))
        script.write_text(lua_script(text, headers))
        cmd = [
            wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency",
            "--timeout", "10s", "-s", str(script), url,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return parse_wrk(done.stdout)


def parse_wrk(out: str) -> WrkResult:
    """Requests/s, latency percentiles and error counts from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(rf"^\s+50%\s+{_TIME}", out, re.M)
    p99 = re.search(rf"^\s+99%\s+{_TIME}", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=float(p50.group(1)) * _UNITS[p50.group(2)],
        p99_ms=float(p99.group(1)) * _UNITS[p99.group(2)],
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )

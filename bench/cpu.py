"""Where the CPU went during a measurement: the server's processes, wrk, and everything else.

On a small shared machine another process's burst skews a point by itself; recording the other
processes' share next to each point tells a real difference from a noisy one. Read from /proc.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds spent busy (not idle, not waiting for I/O) by all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def processes_busy_s(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each live process in ``pids``."""
    busy = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        busy[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return busy


def children_busy_s() -> float:
    """CPU seconds of this process's reaped children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuShare:
    """Average cores used during a measurement by the server, by wrk, and by anything else."""

    server: float = 0.0
    client: float = 0.0
    other: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


@contextmanager
def cpu_share(server_pids: Iterable[int]) -> Iterator[CpuShare]:
    """Measure the block; the yielded CpuShare is filled in when it ends.

    Only this process's children that exit inside the block count as the client (wrk).
    """
    pids = list(server_pids)
    share = CpuShare()
    t0, m0, c0, s0 = time.monotonic(), machine_busy_s(), children_busy_s(), processes_busy_s(pids)
    yield share
    wall = time.monotonic() - t0
    s1 = processes_busy_s(pids)
    server = sum(s1[p] - s0[p] for p in s1.keys() & s0.keys())
    client = children_busy_s() - c0
    share.server, share.client = server / wall, client / wall
    share.other = max(0.0, (machine_busy_s() - m0) / wall - share.server - share.client)


def wait_for_quiet(
    pids: Iterable[int], max_wait_s: float, threshold: float = 0.3, sample_s: float = 2.0
) -> float:
    """Wait (at most ``max_wait_s``) until processes other than ``pids`` use under ``threshold``
    cores; returns the cores they used in the last sample."""
    pids = list(pids)
    deadline = time.monotonic() + max_wait_s
    while True:
        with cpu_share(pids) as share:
            time.sleep(sample_s)
        if share.other < threshold or time.monotonic() >= deadline:
            return share.other

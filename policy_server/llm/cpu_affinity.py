"""Keeps vLLM's engine core off the cores vLLM's CPU workers compute on.

On CPU, vLLM binds each worker's OpenMP threads to cores of its own (``VLLM_CPU_OMP_THREADS_BIND``,
``auto`` by default) and leaves one core unbound "for the scheduler process", but binds nothing
else: the engine core's scheduler loop, which keeps a core busy while requests run, and the
workers' own I/O threads land on the workers' cores as often as not. Measured at 16 clients on a
76M model on 2 cores, the worker then spent 8.9 ms of CPU per token against 7.2 ms under vLLM's
own server; with the other processes moved off its core, 7.3 ms.

``keep_off_workers`` moves every thread of the engine core and the workers, except the workers'
bound threads, to the cores no worker holds (vLLM's reserved ones), and ``CoreSplit.undo`` moves
them back. The replica's (or the local gateway's) own threads stay unbound: on a machine where
vLLM reserves one core of many, pinning them there too would leave them one core to share with
the scheduler loop. ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (vLLM's own switch) turns the split off
with the binding, as does a machine whose cores the workers hold all of.

``cpu_threads_bind`` chooses that binding: ``nobind`` on a machine of 2 cores, where vLLM's ``auto``
leaves the worker one core, ``auto`` on larger ones, unless the spec or the environment says
otherwise; ``engine_environment`` adds the worker's thread count.

psutil lists processes and threads; no kept library moves a process tree around another
process's bound threads, hence this module. Linux only (elsewhere it does nothing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

from policy_server.schema.llm import CPU_THREADS_BIND

log = logging.getLogger(__name__)

BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"
SMALL_MACHINE_CORES = 2
"""Up to this many cores vLLM's ``auto`` binding leaves its worker a single core: ``nobind`` instead."""


@dataclass(frozen=True)
class CPUWorker:
    """One vLLM CPU worker process and the cores its compute threads are bound to."""

    pid: int
    cores: frozenset[int]


def worker_of_this_process() -> CPUWorker:
    """This process as a worker: the cores its main (OpenMP master) thread is bound to. Runs inside
    vLLM's worker (``vllm_worker.WeightLoader.cpu_worker``)."""
    return CPUWorker(os.getpid(), frozenset(os.sched_getaffinity(0)))


def all_cores() -> frozenset[int]:
    """Every core of the machine (the kernel keeps a mask to the container's own cpuset)."""
    return frozenset(range(os.cpu_count() or 1))


def cores_left(workers: list[CPUWorker], cores: frozenset[int]) -> frozenset[int]:
    """The cores no worker is bound to; empty when there is nothing to split (no worker, or
    workers that hold every core)."""
    taken = frozenset().union(*(w.cores for w in workers))
    return cores - taken if taken and taken < cores else frozenset()


@dataclass
class CoreSplit:
    """The threads ``keep_off_workers`` moved, with the cores each had before."""

    moved: dict[int, set[int]] = field(default_factory=dict)

    def undo(self) -> None:
        """Give every moved thread that still runs its cores back."""
        for tid, cores in self.moved.items():
            _set(tid, cores)
        self.moved.clear()


def cpu_threads_bind(setting: str | None, environ: Mapping[str, str], cores: int) -> str:
    """The value of vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for an engine on CPU: the spec's setting,
    else the environment's, else ``nobind`` on a machine of at most ``SMALL_MACHINE_CORES`` cores
    (vLLM's ``auto`` keeps one core for its scheduler and binds the worker's compute to the rest)
    and ``auto`` on a larger one."""
    if setting is not None:
        return setting
    if BIND_VARIABLE in environ:
        return environ[BIND_VARIABLE]
    return "nobind" if cores <= SMALL_MACHINE_CORES else "auto"


def engine_environment(setting: str | None, environ: Mapping[str, str], cores: int) -> dict[str, str]:
    """What vLLM's engine processes inherit on CPU: the binding (``cpu_threads_bind``) and, with
    ``nobind``, one OpenMP thread per core for the worker, as vLLM gives a bound worker one per bound
    core. (Ray sets ``OMP_NUM_THREADS`` to a replica's CPUs, 1 by default, which the worker would
    inherit; measured on the 76M model on 2 cores at 16 clients: 132 tokens/s with 1, 200 with 2.)"""
    bind = cpu_threads_bind(setting, environ, cores)
    if not CPU_THREADS_BIND.fullmatch(bind):  # the spec's is checked at parse time, the environment's here
        raise ValueError(f"{BIND_VARIABLE}: expected auto, nobind or a core list such as 0-2,5; got {bind!r}")
    missing = sorted(set(core_list(bind)) - set(range(cores)))
    if missing:  # vLLM would start with its worker silently unbound
        raise ValueError(f"cpu_threads_bind {bind!r} names cores {missing} that this machine lacks "
                         f"(it has {cores}: 0-{cores - 1})")
    return {BIND_VARIABLE: bind, **({"OMP_NUM_THREADS": str(cores)} if bind == "nobind" else {})}


def core_list(bind: str) -> list[int]:
    """The cores of a binding's core list (``0-2,5`` → 0, 1, 2, 5); none for ``auto`` and ``nobind``."""
    if bind in ("auto", "nobind"):
        return []
    cores: list[int] = []
    for part in bind.split(","):
        first, _, last = part.partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return cores


def spread_over_all_cores(pid: int | None = None) -> None:
    """Let every thread of a process run on every core again (a process inherits the cores of the
    thread that started it; vLLM picks its workers' cores among those the starting thread has)."""
    if hasattr(os, "sched_setaffinity"):
        for tid in _threads(pid or os.getpid()):
            _set(tid, set(all_cores()))


def keep_off_workers(workers: list[CPUWorker]) -> CoreSplit:
    """Move every thread of vLLM's engine processes (each worker's parent, the engine core, and the
    workers) to the cores no worker is bound to, except the workers' threads bound within their
    cores. Returns what moved."""
    split = CoreSplit()
    rest = cores_left(workers, all_cores()) if hasattr(os, "sched_setaffinity") else frozenset()
    if not rest:
        return split
    bound = {w.pid: w.cores for w in workers}
    for pid in {*bound, *(_parent(pid) for pid in bound)} - {None}:
        for tid in _threads(pid):
            before = _get(tid)
            if before is None or (pid in bound and before <= bound[pid]) or before <= rest:
                continue
            if _set(tid, set(rest)):
                split.moved[tid] = before
    log.info("moved %d threads off the cores of vLLM's CPU workers %s, onto %s",
             len(split.moved), sorted(set().union(*bound.values())), sorted(rest))
    return split


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _get(tid: int) -> set[int] | None:
    try:
        return os.sched_getaffinity(tid)
    except OSError:  # the thread ended
        return None


def _set(tid: int, cores: set[int]) -> bool:
    try:
        os.sched_setaffinity(tid, cores)
    except OSError:  # the thread ended, or is not ours to move
        return False
    return True

"""cpu_affinity: a process tree moved off a worker's bound cores, the worker's bound threads left
where they are, and everything given back. Real processes and threads (Linux, 2 cores or more)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest

from policy_server.llm.cpu_affinity import (
    BIND_VARIABLE,
    CPUWorker,
    all_cores,
    core_list,
    cores_left,
    cpu_threads_bind,
    engine_environment,
    keep_off_workers,
    spread_over_all_cores,
)

# A tree as vLLM makes one: a parent (the engine core) whose child (the worker) binds its main thread
# to core 0 and starts a second thread that inherits the binding, after one unbound thread.
TREE = """
import os, subprocess, sys, threading, time
if sys.argv[1] == "worker":
    loose = threading.Thread(target=time.sleep, args=(60,), daemon=True); loose.start()
    os.sched_setaffinity(0, {0})
    bound = threading.Thread(target=time.sleep, args=(60,), daemon=True); bound.start()
    print("ready", flush=True); time.sleep(60)
else:
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "worker"], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    print(child.pid, flush=True); time.sleep(60)
"""


def test_cores_left_are_the_cores_no_worker_holds() -> None:
    cores = frozenset({0, 1, 2, 3})
    assert cores_left([CPUWorker(1, frozenset({0})), CPUWorker(2, frozenset({1}))], cores) == {2, 3}
    assert cores_left([CPUWorker(1, frozenset({0, 1, 2, 3}))], cores) == frozenset()  # nothing to split
    assert cores_left([], cores) == frozenset()


def test_the_binding_is_the_specs_else_the_environments_else_nobind_on_two_cores() -> None:
    assert cpu_threads_bind(None, {}, 1) == "nobind"
    assert cpu_threads_bind(None, {}, 2) == "nobind"  # vLLM's auto would leave the worker one core
    assert cpu_threads_bind(None, {}, 3) == "auto"
    assert cpu_threads_bind(None, {BIND_VARIABLE: "auto"}, 2) == "auto"
    assert cpu_threads_bind("0-1", {BIND_VARIABLE: "nobind"}, 64) == "0-1"


def test_an_unbound_worker_gets_a_thread_per_core_a_bound_one_what_vllm_gives_it() -> None:
    assert engine_environment(None, {"OMP_NUM_THREADS": "1"}, 2) == {BIND_VARIABLE: "nobind", "OMP_NUM_THREADS": "2"}
    assert engine_environment(None, {}, 8) == {BIND_VARIABLE: "auto"}  # vLLM sets it to the bound cores
    assert engine_environment("1-3", {}, 8) == {BIND_VARIABLE: "1-3"}


def test_a_core_list_naming_cores_the_machine_lacks_is_refused() -> None:
    assert core_list("0-2,5") == [0, 1, 2, 5] and core_list("nobind") == []
    with pytest.raises(ValueError, match=re.escape("cpu_threads_bind '1,5' names cores [5] that this machine lacks (it has 2: 0-1)")):
        engine_environment("1,5", {}, 2)
    with pytest.raises(ValueError, match=re.escape("names cores [2, 3]")):
        engine_environment(None, {BIND_VARIABLE: "0-3"}, 2)
    with pytest.raises(ValueError, match=re.escape(f"{BIND_VARIABLE}: expected auto, nobind or a core list such as 0-2,5; got '0-1|2-3'")):
        engine_environment(None, {BIND_VARIABLE: "0-1|2-3"}, 4)  # vLLM's form for several workers


@pytest.fixture
def tree() -> tuple[psutil.Process, psutil.Process]:
    assert len(all_cores()) >= 2, "needs two cores"
    parent = subprocess.Popen([sys.executable, "-c", TREE, "parent", TREE], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    yield psutil.Process(parent.pid), psutil.Process(worker_pid)
    parent.kill()
    psutil.Process(worker_pid).kill()


def affinities(proc: psutil.Process) -> dict[int, set[int]]:
    return {t.id: os.sched_getaffinity(t.id) for t in proc.threads()}


def test_the_tree_moves_off_the_workers_cores_but_its_bound_threads_stay(tree: tuple[psutil.Process, psutil.Process]) -> None:
    parent, worker = tree
    before = {**affinities(parent), **affinities(worker)}
    split = keep_off_workers([CPUWorker(worker.pid, frozenset({0}))])
    rest = all_cores() - {0}
    assert all(cores == rest for cores in affinities(parent).values())
    after = affinities(worker)
    assert sorted(sorted(cores) for cores in after.values()) == sorted([[0], [0], sorted(rest)])  # main, bound, loose
    split.undo()
    assert {**affinities(parent), **affinities(worker)} == before


def test_a_worker_bound_to_every_core_splits_nothing(tree: tuple[psutil.Process, psutil.Process]) -> None:
    parent, worker = tree
    split = keep_off_workers([CPUWorker(worker.pid, all_cores())])
    assert split.moved == {}
    assert all(cores == set(all_cores()) for cores in affinities(parent).values())


def test_spreading_gives_an_inherited_pin_back_all_cores(tree: tuple[psutil.Process, psutil.Process]) -> None:
    _, worker = tree
    assert any(cores == {0} for cores in affinities(worker).values())
    spread_over_all_cores(worker.pid)
    assert all(cores == set(all_cores()) for cores in affinities(worker).values())

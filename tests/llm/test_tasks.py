"""TaskStore: states, 404s, results handed out once (atomically), expiry by a fake clock, the bound."""

from __future__ import annotations

import threading

import pytest

from policy_server.errors import Conflict, NotFound, QueueFull, TaskLost
from policy_server.llm.tasks import TaskStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> TaskStore:
    return TaskStore(ttl_s=600, max_tasks=3, clock=clock)


def test_a_task_goes_from_pending_to_done_with_its_meta_and_result(store: TaskStore) -> None:
    task_id = store.create({"question": "2+2?"})
    incarnation, unique = task_id.split("-")
    assert incarnation == store.incarnation and len(unique) == 32 and int(unique, 16) >= 0
    view = store.get(task_id)
    assert (view.task_id, view.state, view.meta, view.result, view.error) == (
        task_id,
        "pending",
        {"question": "2+2?"},
        None,
        None,
    )
    store.complete(task_id, {"result": ["4"]})
    assert store.get(task_id).state == "done"
    assert store.get(task_id).result == {"result": ["4"]}


def test_a_failed_task_carries_its_message(store: TaskStore) -> None:
    task_id = store.create()
    store.fail(task_id, "generation failed: out of memory")
    view = store.get(task_id)
    assert (view.state, view.result, view.error) == ("failed", None, "generation failed: out of memory")


def test_an_unknown_id_is_not_found(store: TaskStore) -> None:
    with pytest.raises(NotFound, match="no task 'nope'") as info:
        store.get("nope")
    assert info.value.status == 404
    for call in (
        lambda: store.complete("nope", 1),
        lambda: store.fail("nope", "x"),
        lambda: store.take("nope"),
    ):
        with pytest.raises(NotFound):
            call()


def test_a_finished_task_is_taken_once_then_forgotten(store: TaskStore) -> None:
    done, failed = store.create(), store.create()
    store.complete(done, "answer")
    store.fail(failed, "out of memory")
    assert store.get(done).result == "answer"  # get only reads
    assert store.take(done).result == "answer"
    taken = store.take(failed)
    assert (taken.state, taken.error) == ("failed", "out of memory")
    for task_id in (done, failed):
        with pytest.raises(NotFound, match="already fetched"):
            store.take(task_id)
        with pytest.raises(NotFound):
            store.get(task_id)
    assert len(store) == 0


def test_a_pending_task_stays_when_taken_and_cannot_be_finished_twice(store: TaskStore) -> None:
    task_id = store.create()
    assert store.take(task_id).state == "pending"
    assert store.take(task_id).state == "pending"
    store.complete(task_id, 1)
    with pytest.raises(Conflict, match="already done"):
        store.fail(task_id, "late")
    assert store.take(task_id).result == 1


def race(store: TaskStore, fetchers: int, result: int) -> tuple[list[object], int]:
    """``fetchers`` threads poll one new task with ``take`` while another completes it, all let go
    at once; returns the results the fetchers got and how many of them got a 404."""
    task_id = store.create()
    start = threading.Barrier(fetchers + 1)
    got: list[object] = []
    missed: list[int] = []

    def poll() -> None:
        start.wait()
        while True:
            try:
                view = store.take(task_id)
            except NotFound:
                missed.append(1)
                return
            if view.state == "done":
                got.append(view.result)
                return

    def finish() -> None:
        start.wait()
        store.complete(task_id, result)

    threads = [threading.Thread(target=poll) for _ in range(fetchers)] + [threading.Thread(target=finish)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return got, len(missed)


@pytest.mark.parametrize("fetchers", [2, 8])
def test_concurrent_fetches_as_a_task_finishes_hand_the_result_to_exactly_one(fetchers: int) -> None:
    """x1's "fetched once, then forgotten" without a race: whatever the interleaving, exactly one
    fetch gets the result and every other one a 404."""
    store = TaskStore(max_tasks=10)
    for round_ in range(200):
        assert race(store, fetchers, round_) == ([round_], fetchers - 1), round_
    assert len(store) == 0


def test_pending_tasks_expire_ttl_after_creation_and_results_ttl_after_completion(
    store: TaskStore, clock: FakeClock
) -> None:
    slow, never = store.create(), store.create()
    clock.now += 500
    store.complete(slow, "late but kept")
    clock.now += 100  # never: 600 s after creation
    with pytest.raises(NotFound):
        store.get(never)
    clock.now += 499  # slow: 599 s after completion
    assert store.get(slow).result == "late but kept"
    clock.now += 1
    with pytest.raises(NotFound, match="expired"):
        store.get(slow)
    assert len(store) == 0


def test_completing_an_expired_task_is_not_found(store: TaskStore, clock: FakeClock) -> None:
    task_id = store.create()
    clock.now += 600
    with pytest.raises(NotFound):
        store.complete(task_id, "too late")


def test_beyond_max_tasks_create_raises_queue_full_until_room_is_made(
    store: TaskStore, clock: FakeClock
) -> None:
    ids = [store.create() for _ in range(3)]
    with pytest.raises(QueueFull, match="max_tasks=3") as info:
        store.create()
    assert (info.value.status, info.value.code) == (429, "queue_full")
    store.complete(ids[0], 0)
    store.take(ids[0])
    store.create()
    clock.now += 600
    store.create()  # the expired ones made room
    assert store.stats().pending == 1


def test_stats_count_each_state(store: TaskStore) -> None:
    a, b, _ = store.create(), store.create(), store.create()
    store.complete(a, 1)
    store.fail(b, "x")
    stats = store.stats()
    assert (stats.pending, stats.done, stats.failed) == (1, 1, 1)


def test_concurrent_use_from_threads_loses_nothing() -> None:
    store = TaskStore(max_tasks=10_000)
    ids: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(200):
            task_id = store.create({"n": n, "i": i})
            store.complete(task_id, (n, i))
            with lock:
                ids.append(task_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1600 == len(store)
    assert all(store.get(task_id).result == tuple(store.get(task_id).meta.values()) for task_id in ids)


def test_a_task_of_a_store_that_died_is_lost_not_unknown(store: TaskStore) -> None:
    task_id = store.create()
    restarted = TaskStore(ttl_s=600, max_tasks=3)  # the replica's process died; Serve started another
    with pytest.raises(TaskLost, match="submit it again") as lost:
        restarted.take(task_id)
    assert lost.value.status == 410
    with pytest.raises(NotFound):  # an id this server never handed out stays a 404
        restarted.take("0123456789abcdef")
    with pytest.raises(NotFound):  # ... as does one of this store that was fetched already
        store.complete(task_id, "r")
        store.take(task_id)
        store.take(task_id)

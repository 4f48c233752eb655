"""Start-up's watch over placement: when it fails, waits or says nothing (pure: no Ray)."""

from __future__ import annotations

import pytest

from policy_server.errors import StartupError
from policy_server.serving.runtime.placement import GIB, PlacementWatch, Unplaced, placement_message

LLM = Unplaced("deployment llm-policy of Serve app policy-server-llm-policy", 1, {"CPU": 1.0, "GPU": 0.0})
TRAINER = Unplaced("actor policy-server-default-trainer", 1, {"CPU": 1.0})
FREE, TOTAL = {"CPU": 0.0, "memory": 3 * GIB}, {"CPU": 2.0, "memory": 16 * GIB}


def test_the_message_names_each_unplaced_actor_its_ask_and_what_is_free() -> None:
    replicas = Unplaced("deployment policy-cart of Serve app p-cart", 3, {"CPU": 0.5, "GPU": 1.0})
    assert placement_message([LLM, replicas], FREE, TOTAL) == (
        "deployment llm-policy of Serve app policy-server-llm-policy cannot be placed: it asks for 1 CPU; "
        "deployment policy-cart of Serve app p-cart cannot be placed: its 3 replicas each ask for 0.5 CPU, 1 GPU; "
        "the cluster has free: 0 of 2 CPU, 0 of 0 GPU, 3 of 16 GiB memory"
    )


def test_an_unknown_ask_is_left_out() -> None:
    unknown = Unplaced("deployment x of Serve app y", 1, None)
    assert placement_message([unknown], FREE, TOTAL).startswith("deployment x of Serve app y cannot be placed; the cluster")


def test_it_fails_once_something_stayed_unplaced_for_the_grace() -> None:
    watch = PlacementWatch(grace_s=20, wait=False)
    assert watch.observe(100.0, [TRAINER], FREE, TOTAL) is None
    assert watch.observe(119.0, [TRAINER], FREE, TOTAL) is None
    with pytest.raises(StartupError) as failed:
        watch.observe(120.0, [TRAINER, LLM], FREE, TOTAL)
    message = failed.value.message
    assert message.startswith("actor policy-server-default-trainer cannot be placed: it asks for 1 CPU; deployment llm-policy")
    assert "(waited 20 s); free them (`ray status`" in message and "POLICY_SERVER_WAIT_FOR_RESOURCES=true" in message


def test_the_grace_starts_again_once_everything_was_placed() -> None:
    """A replica placed late (another job ended) does not count against the next one."""
    watch = PlacementWatch(grace_s=20, wait=False)
    watch.observe(0.0, [LLM], FREE, TOTAL)
    assert watch.observe(15.0, [], FREE, TOTAL) is None
    assert watch.observe(16.0, [TRAINER], FREE, TOTAL) is None
    assert watch.observe(35.0, [TRAINER], FREE, TOTAL) is None


def test_waiting_for_resources_says_so_after_the_grace_and_every_30_s() -> None:
    watch = PlacementWatch(grace_s=20, wait=True)
    said = [t for t in range(100) if watch.observe(float(t), [LLM], FREE, TOTAL) is not None]
    assert said == [20, 50, 80]
    note = PlacementWatch(grace_s=0.0, wait=True).observe(0.0, [LLM], FREE, TOTAL)
    assert note is not None and note.endswith("; still waiting for them (0 s, POLICY_SERVER_WAIT_FOR_RESOURCES)")

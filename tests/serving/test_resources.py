"""What a schema asks Ray for, against what the cluster has (pure: no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import multi_policy_schema, training_schema

from policy_server.errors import SchemaError, StartupError
from policy_server.schema.config import ServerSchema, parse_schema
from policy_server.schema.llm import LLMSection
from policy_server.serving.runtime.placement import HOW_TO, HOW_TO_FREE
from policy_server.serving.runtime.resources import check_fits, check_free, held_by, resource_requests

ROOT = Path(__file__).resolve().parents[2]
TWO_CPUS = {"CPU": 2.0}


def llm_example(**extra: Any) -> ServerSchema:
    """examples/llm/schema.yaml's `llm:` section (folders unchecked) with ``extra`` on both models."""
    raw = yaml.safe_load((ROOT / "examples/llm/schema.yaml").read_text())["llm"]
    for key in ("policy", "value"):
        raw[key] |= extra
    return ServerSchema(policies={}, default_policy=None, llm=LLMSection.model_validate(raw))


def test_the_llm_example_with_a_training_section_is_refused_on_two_cpus_naming_each_field() -> None:
    """The fresh user's hang: the README's `training:` section added to the LLM example asks for 5
    CPUs (policy, value, GRPO runs, two x1 trainers) and Ray on this machine has 2."""
    requests = resource_requests(llm_example(training={}), gpus_in_cluster=False)
    with pytest.raises(SchemaError) as refused:
        check_fits(requests, TWO_CPUS, [TWO_CPUS])
    message = refused.value.message
    assert message.startswith("the schema asks Ray for 5 CPUs and the cluster has 2: ")
    for part in (
        "llm.policy.resources.num_cpus: 1 (the LLM policy's replicas)",
        "llm.policy.training.num_cpus: 1 (x1's trainer)",
        "llm.policy.training.num_cpus: 1 (GRPO runs)",
        "llm.value.resources.num_cpus: 1 (the LLM value's replicas)",
        "llm.value.training.num_cpus: 1 (x1's trainer)",
    ):
        assert part in message


def test_the_llm_example_fits_as_it_is_and_with_trainers_that_share_cores() -> None:
    check_fits(resource_requests(llm_example(), False), TWO_CPUS, [TWO_CPUS])
    check_fits(resource_requests(llm_example(training={"num_cpus": 0}), False), TWO_CPUS, [TWO_CPUS])


def test_training_turned_off_starts_no_trainer() -> None:
    requests = resource_requests(llm_example(training={"allow_training": False}), False)
    assert [r.name for r in requests] == ["llm-policy", "llm-tasks", "llm-value"]
    assert [r.num_cpus for r in requests] == [1, 0, 1]  # the tasks deployment sets 0 (Serve's default: 1)


def test_replicas_multiply_and_fractions_add_up_exactly(model_dir: Path) -> None:
    """Ten requests of 0.1 fit one CPU (float sums fall a hair over 1); 3 replicas of 1 do not fit 2."""
    raw = multi_policy_schema(model_dir)
    raw["policies"] = {f"p{i}": raw["policies"]["lpoc"] for i in range(10)}
    raw["parameters"]["default_policy"] = "p0"
    check_fits(resource_requests(parse_schema(raw, model_dir), False), {"CPU": 1.0}, [{"CPU": 1.0}])
    raw["policies"]["p0"] = raw["policies"]["p0"] | {"resources": {"num_replicas": 3, "num_cpus": 1}}
    with pytest.raises(SchemaError, match=r"policies\.p0\.resources\.num_cpus: 1 × 3 replicas"):
        check_fits(resource_requests(parse_schema(raw, model_dir), False), TWO_CPUS, [TWO_CPUS])


def test_an_autoscaled_deployment_counts_its_start_replicas_and_names_its_maximum(model_dir: Path) -> None:
    """Start-up needs room for the replicas Serve starts with (min_replicas, or initial_replicas);
    the rest come when load asks and the cluster has room."""
    raw = multi_policy_schema(model_dir)
    auto = {"num_cpus": 1, "num_replicas": "auto", "min_replicas": 2, "max_replicas": 8}
    raw["policies"] = {"lpoc": raw["policies"]["lpoc"] | {"resources": auto}}
    check_fits(resource_requests(parse_schema(raw, model_dir), False), TWO_CPUS, [TWO_CPUS])
    raw["policies"]["lpoc"]["resources"] = auto | {"initial_replicas": 3}
    with pytest.raises(SchemaError, match=r"policies\.lpoc\.resources\.num_cpus: 1 × 3 replicas at start, autoscaled up to 8 "):
        check_fits(resource_requests(parse_schema(raw, model_dir), False), TWO_CPUS, [TWO_CPUS])
    llm = resource_requests(llm_example(resources={"num_replicas": "auto", "max_replicas": 4, "num_cpus": 0.5}), False)
    assert [(r.name, r.replicas, r.max_replicas) for r in llm] == [("llm-policy", 1, 4), ("llm-tasks", 1, None),
                                                                     ("llm-value", 1, 4)]


def test_the_single_policy_form_names_parameters(model_dir: Path) -> None:
    """The Pathmind form (the bundled example's; its model from the session's models, so the test
    does not depend on what `copy_server_files` left at the top level)."""
    raw = yaml.safe_load((ROOT / "examples/lpoc/schema.yaml").read_text())
    raw["parameters"] |= {"model": str(model_dir / "lpoc.pt"), "resources": {"num_cpus": 3}}
    with pytest.raises(SchemaError, match=r"parameters\.resources\.num_cpus: 3 \(policy default's replicas\)"):
        check_fits(resource_requests(parse_schema(raw, model_dir), False), TWO_CPUS, [TWO_CPUS])


def test_a_policy_trainer_counts(model_dir: Path, tmp_path: Path) -> None:
    raw = training_schema(model_dir, tmp_path)
    raw["policies"]["cart"]["training"]["num_cpus"] = 2
    with pytest.raises(SchemaError, match=r"policies\.cart\.training\.num_cpus: 2 \(policy cart's trainer\)"):
        check_fits(resource_requests(parse_schema(raw, model_dir), False), TWO_CPUS, [TWO_CPUS])


def test_gpus_count_only_where_the_cluster_has_them() -> None:
    schema = llm_example(resources={"num_cpus": 0.5, "num_gpus": 1})
    check_fits(resource_requests(schema, gpus_in_cluster=False), TWO_CPUS, [TWO_CPUS])  # served on CPU
    one_gpu = {"CPU": 2.0, "GPU": 1.0}
    with pytest.raises(SchemaError, match="asks Ray for 2 GPUs and the cluster has 1: llm.policy.resources.num_gpus: 1"):
        check_fits(resource_requests(schema, gpus_in_cluster=True), one_gpu, [one_gpu])


def test_one_replica_must_fit_on_one_node() -> None:
    """Two nodes of 2 CPUs have 4 in all, but no node can place a replica of 3."""
    schema = llm_example(resources={"num_cpus": 3})
    schema = schema.model_copy(update={"llm": schema.llm.model_copy(update={"value": None})})
    with pytest.raises(SchemaError, match="more CPUs than any one node has .the largest has 2.: one replica runs on one node"):
        check_fits(resource_requests(schema, False), {"CPU": 4.0}, [TWO_CPUS, TWO_CPUS])


def issue_schema(model_dir: Path, tmp_path: Path) -> ServerSchema:
    """Issue 14's start-up that hung: a trainable CartPole policy and an LLM policy, all at default
    resources (the LLM's folder unchecked)."""
    raw = training_schema(model_dir, tmp_path)
    cart = raw["policies"]["cart"]
    cart.pop("resources")
    cart["training"].pop("num_cpus")
    raw["policies"] = {"cart": cart}
    schema = parse_schema(raw, model_dir)
    llm = LLMSection.model_validate({"policy": {"path": str(tmp_path)}})
    return schema.model_copy(update={"llm": llm})


def test_the_issues_schema_asks_for_3_cpus_naming_each(model_dir: Path, tmp_path: Path) -> None:
    requests = resource_requests(issue_schema(model_dir, tmp_path), False)
    assert [(r.name, r.num_cpus) for r in requests] == [
        ("cart", 1), ("cart-trainer", 1), ("llm-policy", 1), ("llm-tasks", 0)]
    with pytest.raises(SchemaError, match=r"^the schema asks Ray for 3 CPUs and the cluster has 2: policies.cart.resources.num_cpus: 1"):
        check_fits(requests, TWO_CPUS, [TWO_CPUS])


def test_what_is_free_counts_and_the_servers_own_running_apps_come_back(model_dir: Path, tmp_path: Path) -> None:
    """Another job holds 1.5 of 2 CPUs: refused, naming what is free. A second gateway of the same
    apps (they already run, holding their CPUs) redeploys them in place: not refused."""
    requests = resource_requests(issue_schema(model_dir, tmp_path), False)[:2]  # cart and its trainer: 2 CPUs
    with pytest.raises(StartupError) as refused:
        check_free(requests, {"CPU": 0.5}, held_by(requests, "ps", set()))
    assert refused.value.message.startswith(
        "the schema asks Ray for 2 CPUs and the cluster has 0.5 free: policies.cart.resources.num_cpus: 1 (policy cart's replicas); "
        "policies.cart.training.num_cpus: 1 (policy cart's trainer). Other jobs hold the rest: free them")
    assert held_by(requests, "ps", {"ps-cart", "other-cart"}) == {"CPU": 1.0, "GPU": 0.0}
    check_free(requests, {"CPU": 1.0}, held_by(requests, "ps", {"ps-cart"}))
    with pytest.raises(StartupError, match=r"has 0.5 free \(and this server's running apps hold 1 it redeploys in place\)"):
        check_free(requests, {"CPU": 0.5}, held_by(requests, "ps", {"ps-cart"}))
    assert refused.value.message.endswith(HOW_TO)  # it may say: set the wait setting ...
    with pytest.raises(StartupError) as waiting:  # ... but not while that setting is on (then this is a warning)
        check_free(requests, {"CPU": 0.5}, held_by(requests, "ps", set()), HOW_TO_FREE)
    assert waiting.value.message.endswith(HOW_TO_FREE) and "WAIT_FOR_RESOURCES" not in waiting.value.message


def test_request_names_are_the_runtimes_app_names() -> None:
    """``held_by`` and the placement watch find a request's Serve app by its name."""
    from policy_server.serving.llm_deployment import LLM_GRPO, LLM_POLICY, LLM_TASKS, LLM_VALUE, x1_app_name

    names = {r.name for r in resource_requests(llm_example(training={}), False)}
    assert names == {LLM_POLICY, LLM_VALUE, LLM_TASKS, LLM_GRPO} | {x1_app_name("p", k)[2:] for k in ("policy", "value")}


def test_a_canary_counts_its_own_replicas(model_dir: Path) -> None:
    """The candidate runs on replicas of its own (app ``<prefix>-<policy>-canary``), as many as the policy's."""
    raw = multi_policy_schema(model_dir)
    lpoc = raw["policies"]["lpoc"] | {"resources": {"num_cpus": 1}, "canary": {"model": "lpoc.pt", "mode": "shadow"}}
    raw["policies"] = {"lpoc": lpoc}
    requests = resource_requests(parse_schema(raw, model_dir), False)
    assert [(r.name, r.num_cpus) for r in requests] == [("lpoc", 1), ("lpoc-canary", 1)]
    with pytest.raises(SchemaError, match=r"policies\.lpoc\.resources\.num_cpus: 1 \(policy lpoc's candidate replicas"):
        check_fits(requests, {"CPU": 1.0}, [{"CPU": 1.0}])

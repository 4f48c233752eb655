"""Loading schema.yaml: the Pathmind format unchanged, each extension, and named errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
import torch

from policy_server.errors import SchemaError
from policy_server.export import MLPPolicy, export_module
from policy_server.policies.served import resolve_policy
from policy_server.schema.config import (
    OBSERVATION_TYPES,
    BoxSpec,
    DiscreteSpec,
    ResourceSpec,
    TupleSpec,
    load_schema,
)

API_KEY = "1234567asdfgh-secret"

LPOC = {
    "id": "int",
    "coordinates_0": "int",
    "coordinates_1": "int",
    "has_up_neighbour": "bool",
    "is_up_free": "bool",
    "has_right_neighbour": "bool",
    "is_right_free": "bool",
    "has_down_neighbour": "bool",
    "is_down_free": "bool",
    "has_left_neighbour": "bool",
    "is_left_free": "bool",
}

PATHMIND_SCHEMA = (
    "observations:\n"
    + "".join(f"  {name}:\n    type: {kind}\n" for name, kind in LPOC.items())
    + textwrap.dedent(
        f"""\
        parameters:
          discrete: True
          tuple: False
          api_key: "{API_KEY}"
          url_path: "/my_lpoc_model/"
        """
    )
)


def write(folder: Path, text: str, models: tuple[str, ...] = ("model.pt",)) -> Path:
    """A schema.yaml in ``folder`` with placeholder model files under ``models/``."""
    (folder / "models").mkdir(exist_ok=True)
    for name in models:
        (folder / "models" / name).write_bytes(b"placeholder")
    path = folder / "schema.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def schema_error(path: Path) -> str:
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    return info.value.message


# --- the Pathmind format --------------------------------------------------------------------


def test_pathmind_schema_loads_unchanged(tmp_path: Path) -> None:
    schema = load_schema(write(tmp_path, PATHMIND_SCHEMA))
    assert list(schema.policies) == ["default"] and schema.default_policy == "default"
    policy = schema.policies["default"]
    assert policy.observations is not None
    assert list(policy.observations) == list(LPOC)
    assert {n: o.type for n, o in policy.observations.items()} == LPOC
    assert all(o.width == 1 for o in policy.observations.values())
    assert policy.action_space == DiscreteSpec()
    assert policy.model == (tmp_path / "models" / "model.pt").resolve()
    assert policy.resources == ResourceSpec()
    assert schema.api_key is not None and schema.api_key.get_secret_value() == API_KEY
    assert schema.url_path == "my_lpoc_model"


def test_several_server_keys_and_a_policys_own_keys_are_read_and_never_shown(tmp_path: Path) -> None:
    path = write(tmp_path, PATHMIND_SCHEMA + "  api_keys: [second-secret, third-secret]\n")
    schema = load_schema(path)
    assert [k.get_secret_value() for k in schema.api_keys] == [API_KEY, "second-secret", "third-secret"]
    assert schema.policy_keys == {}  # in the one-policy form, `parameters` keys are server-wide
    many = write(tmp_path, """\
        policies:
          lpoc:
            observations: {a: {type: float}}
            api_keys: [lpoc-secret]
          other:
            observations: {a: {type: float}}
        """)
    schema = load_schema(many)
    assert {n: [k.get_secret_value() for k in keys] for n, keys in schema.policy_keys.items()} == {"lpoc": ["lpoc-secret"]}
    assert "secret" not in json.dumps(schema.public())
    path.write_text(PATHMIND_SCHEMA + "  api_keys: ['']\n")
    assert "parameters.api_keys.0: String should have at least 1 character" in schema_error(path)


def test_pathmind_tuple_flag_gives_a_tuple_space(tmp_path: Path) -> None:
    text = PATHMIND_SCHEMA.replace("tuple: False", "tuple: True")
    assert load_schema(write(tmp_path, text)).policies["default"].action_space == TupleSpec()


def test_public_schema_never_shows_the_api_key(tmp_path: Path) -> None:
    schema = load_schema(write(tmp_path, PATHMIND_SCHEMA))
    public = schema.public()
    text = json.dumps(public)
    assert API_KEY not in text
    assert "api_key" not in text
    assert API_KEY not in repr(schema) and API_KEY not in str(schema)
    assert public["url_path"] == "my_lpoc_model"
    assert public["policies"]["default"]["model"] == "model.pt"  # the file name, not the path
    assert list(public["policies"]["default"]["observations"]) == list(LPOC)


# --- extensions -----------------------------------------------------------------------------


def test_discrete_action_space_with_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        observations:
          x: {type: float}
        parameters:
          action_space: {type: discrete, n: 4, names: [up, right, down, left]}
        """,
    )
    space = load_schema(path).policies["default"].action_space
    assert space == DiscreteSpec(n=4, names=["up", "right", "down", "left"])


def test_discrete_names_must_match_n(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        parameters:
          action_space: {type: discrete, n: 3, names: [a, b]}
        """,
    )
    message = schema_error(path)
    assert "parameters.action_space" in message and "2" in message and "3" in message


def test_tuple_action_space_with_nvec(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        observations:
          x: {type: float}
        parameters:
          action_space: {type: tuple, nvec: [3, 2]}
        """,
    )
    assert load_schema(path).policies["default"].action_space == TupleSpec(nvec=[3, 2])


def test_box_action_space_with_shape_and_bounds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        observations:
          x: {type: "List[float]", min_items: 3, max_items: 3}
        parameters:
          discrete: False
          action_space: {type: box, shape: [2], low: -1, high: [1.0, 2.5]}
        """,
    )
    policy = load_schema(path).policies["default"]
    assert policy.action_space == BoxSpec(shape=[2], low=-1.0, high=[1.0, 2.5])
    assert policy.observations is not None and policy.observations["x"].width == 3


def test_pathmind_continuous_flag_gives_a_box(tmp_path: Path) -> None:
    path = write(tmp_path, "parameters:\n  discrete: False\n")
    assert load_schema(path).policies["default"].action_space == BoxSpec()


def test_model_path_relative_to_the_schema(tmp_path: Path) -> None:
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "policy.pt2").write_bytes(b"placeholder")
    # two files in models/ would be ambiguous: an explicit model path wins
    path = write(tmp_path, "parameters:\n  model: trained/policy.pt2\n", models=("a.pt", "b.pt"))
    assert load_schema(path).policies["default"].model == (tmp_path / "trained" / "policy.pt2").resolve()


def test_resources(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        parameters:
          resources: {num_replicas: 3, num_gpus: 0.5, max_batch_size: 64, batch_wait_ms: 2}
        """,
    )
    resources = load_schema(path).policies["default"].resources
    assert resources == ResourceSpec(num_replicas=3, num_gpus=0.5, max_batch_size=64, batch_wait_ms=2.0)
    assert resources.num_cpus == 1.0
    assert resources.concurrent_batches == 6


def test_num_replicas_auto_carries_serves_autoscaling_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        parameters:
          resources: {num_replicas: auto, min_replicas: 2, max_replicas: 5, target_ongoing_requests: 3,
                      upscale_delay_s: 5, downscale_delay_s: 60}
        """,
    )
    resources = load_schema(path).policies["default"].resources
    assert resources.autoscaled and (resources.min_count, resources.start_count, resources.max_count) == (2, 2, 5)
    assert resources.serve_options() == {
        "num_replicas": None,
        "autoscaling_config": {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 3.0,
                               "upscale_delay_s": 5.0, "downscale_delay_s": 60.0},
    }
    # the gateway keeps target × max_replicas batches in flight at full load: enough to ask for 5
    assert resources.concurrent_batches == 15


def test_num_replicas_auto_defaults_to_serves_and_starts_at_initial_replicas() -> None:
    resources = ResourceSpec(num_replicas="auto", max_replicas=3, initial_replicas=2)
    assert resources.serve_options()["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 2}
    assert (resources.start_count, resources.target, resources.concurrent_batches) == (2, 2.0, 6)
    assert ResourceSpec(num_replicas=3).serve_options() == {"num_replicas": 3}


@pytest.mark.parametrize(
    "resources,expected",
    [
        ("{num_replicas: 2, max_replicas: 4}", ("parameters.resources: max_replicas applies only to `num_replicas: auto`,"
         " and num_replicas is 2 (a fixed count)")),
        ("{min_replicas: 2}", "min_replicas applies only to `num_replicas: auto`"),
        ("{num_replicas: auto}", "parameters.resources: `num_replicas: auto` needs max_replicas"),
        ("{num_replicas: auto, min_replicas: 4, max_replicas: 3}", "min_replicas 4 is above max_replicas 3"),
        ("{num_replicas: auto, max_replicas: 3, initial_replicas: 4}", "initial_replicas 4 is outside min_replicas..max_replicas (1..3)"),
        ("{num_replicas: auto, max_replicas: 0}", "parameters.resources.max_replicas: Input should be greater than or equal to 1"),
        ("{num_replicas: auto, min_replicas: 0, max_replicas: 2}", "parameters.resources.min_replicas: Input should be greater"),
        ("{num_replicas: auto, max_replicas: 2, target_ongoing_requests: 0}", "parameters.resources.target_ongoing_requests"),
        ("{num_replicas: 0}", "parameters.resources.num_replicas: must be a whole number of at least 1 or `auto`"),
        ("{num_replicas: several}", ("parameters.resources.num_replicas: must be a whole number of at least 1 or `auto`"
         " (Serve's autoscaling), not 'several'")),
        ("{num_replicas: auto, max_replicas: 3, max_concurrent_batches: 4}",
         "max_concurrent_batches 4 is below target_ongoing_requests 2 × max_replicas 3 = 6"),
    ],
)
def test_replica_fields_refused_with_the_field_named(tmp_path: Path, resources: str, expected: str) -> None:
    assert expected in schema_error(write(tmp_path, f"parameters:\n  resources: {resources}\n"))


def test_several_policies_with_default_policy(tmp_path: Path) -> None:
    (tmp_path / "b.pt").write_bytes(b"placeholder")
    path = write(
        tmp_path,
        """\
        parameters:
          default_policy: beta
          api_key: key
        policies:
          alpha:
            observations:
              x: {type: int}
            action_space: {type: discrete, names: [l, r]}
          beta:
            model: b.pt
            tuple: true
            observations:
              y: {type: "List[float]", min_items: 2, max_items: 2}
              z: {type: bool}
            resources: {num_replicas: 2}
        """,
    )
    schema = load_schema(path)
    assert list(schema.policies) == ["alpha", "beta"]
    assert schema.default_policy == "beta"
    alpha, beta = schema.policies["alpha"], schema.policies["beta"]
    assert alpha.name == "alpha" and beta.name == "beta"
    assert alpha.action_space == DiscreteSpec(names=["l", "r"])
    assert alpha.model == (tmp_path / "models" / "model.pt").resolve()
    assert beta.action_space == TupleSpec()
    assert beta.model == (tmp_path / "b.pt").resolve()
    assert alpha.observations is not None and list(alpha.observations) == ["x"]
    assert beta.observations is not None and list(beta.observations) == ["y", "z"]
    assert beta.resources.num_replicas == 2 and alpha.resources.num_replicas == 1


def test_first_policy_is_the_default_when_none_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "policies:\n  second: {}\n  first: {}\n")
    assert load_schema(path).default_policy == "second"


# --- errors name the field ------------------------------------------------------------------


def test_unknown_observation_type_lists_the_valid_types(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, "observations:\n  speed: {type: double}\n"))
    assert "observations.speed.type" in message and "'double'" in message
    assert all(t in message for t in OBSERVATION_TYPES)


def test_unknown_observation_type_in_a_named_policy(tmp_path: Path) -> None:
    message = schema_error(
        write(tmp_path, "policies:\n  a:\n    observations:\n      speed: {type: integer}\n")
    )
    assert "policies.a.observations.speed.type" in message
    assert all(t in message for t in OBSERVATION_TYPES)


@pytest.mark.parametrize(
    "text,field",
    [
        ("parameters:\n  discrete: true\n  bogus: 1\n", "parameters.bogus"),
        ("observations:\n  x: {type: int, unit: m}\n", "observations.x.unit"),
        ("policy:\n  a: {}\n", "policy"),
        ("parameters:\n  resources: {replicas: 2}\n", "parameters.resources.replicas"),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, field: str) -> None:
    assert f"{field}: unknown key" in schema_error(write(tmp_path, text))


def test_missing_model_file(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, "parameters:\n  model: nowhere/policy.pt\n"))
    assert "parameters.model" in message and "not found" in message
    assert str((tmp_path / "nowhere" / "policy.pt").resolve()) in message


def test_missing_model_file_of_a_named_policy(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, "policies:\n  a:\n    model: gone.pt\n"))
    assert "policies.a.model" in message and "gone.pt" in message


@pytest.mark.parametrize("models", [(), ("notes.txt",)])
def test_no_model_in_models_folder(tmp_path: Path, models: tuple[str, ...]) -> None:
    message = schema_error(write(tmp_path, PATHMIND_SCHEMA, models=models))
    assert "parameters.model" in message and "no model file" in message
    assert str((tmp_path / "models").resolve()) in message


def test_two_models_in_models_folder(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, PATHMIND_SCHEMA, models=("a.pt", "b.pt2")))
    assert "parameters.model" in message and "2 model files" in message


def test_default_policy_not_among_policies(tmp_path: Path) -> None:
    message = schema_error(
        write(tmp_path, "parameters:\n  default_policy: gamma\npolicies:\n  alpha: {}\n  beta: {}\n")
    )
    assert "parameters.default_policy" in message
    assert "'gamma'" in message and "alpha" in message and "beta" in message


def test_top_level_observations_with_policies(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, "observations:\n  x: {type: int}\npolicies:\n  a: {}\n"))
    assert message.startswith("observations:")


def test_tuple_of_continuous_actions(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, "parameters:\n  discrete: false\n  tuple: true\n"))
    assert message.startswith("parameters:") and "tuple" in message


def test_min_items_on_a_scalar(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, "observations:\n  x: {type: int, min_items: 2}\n"))
    assert "observations.x" in message and "min_items" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text("observations:\n  id: {type: int\n  x: [\n")
    message = schema_error(path)
    assert "not valid YAML" in message and str(path) in message


def test_missing_schema_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    message = schema_error(path)
    assert "schema file not found" in message and str(path) in message


# --- several open-length lists: they share the columns the model leaves, request by request ----


@pytest.fixture
def real_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_module(MLPPolicy(6, [], nvec=[2]), 6, tmp_path / "real.pt2")


OPEN_LISTS = """\
  a: {type: "List[float]"}
  n: {type: int}
  b: {type: "List[int]", min_items: 1}
"""


def test_two_open_length_lists_share_the_model_width(tmp_path: Path, real_model: Path) -> None:
    path = write(tmp_path, "observations:\n" + OPEN_LISTS + "parameters:\n  model: real.pt2\n", models=())
    served, _ = resolve_policy(load_schema(path).policies["default"])
    assert served.obs_dim == 6
    model = served.observation_model
    assert model is not None
    assert model.model_validate({"a": [0.5] * 4, "n": 1, "b": [2]}).a == [0.5] * 4
    assert model.model_validate({"a": [], "n": 1, "b": [1, 0, 0, 0, 1]}).b == [1, 0, 0, 0, 1]


def test_open_length_lists_that_cannot_fit_the_model_are_refused(tmp_path: Path, real_model: Path) -> None:
    lists = OPEN_LISTS.replace("min_items: 1", "min_items: 6")
    path = write(tmp_path, "observations:\n" + lists + "parameters:\n  model: real.pt2\n", models=())
    with pytest.raises(SchemaError) as info:
        resolve_policy(load_schema(path).policies["default"])
    assert info.value.message.startswith("observations.a: the model leaves 5 columns for the lists a, b")
    assert "sum to 6" in info.value.message


def test_open_length_lists_of_a_named_policy_name_it(tmp_path: Path, real_model: Path) -> None:
    observations = textwrap.indent(OPEN_LISTS.replace("min_items: 1", "min_items: 6"), "    ")
    text = "policies:\n  grid:\n    model: real.pt2\n    observations:\n" + observations
    spec = load_schema(write(tmp_path, text, models=())).policies["grid"]
    with pytest.raises(SchemaError) as info:
        resolve_policy(spec)
    # the field lives under the policy, as every other error of a named policy says
    assert info.value.message.startswith("policies.grid.observations.a: the model leaves 5 columns")


# --- observation names: any text works as a JSON field name; YAML's non-text keys are refused ---


@pytest.mark.parametrize(
    "key,shown,kind",
    [
        ("1", "1", "an integer"),
        ("yes", "true", "a boolean"),
        ("off", "false", "a boolean"),
        ("~", "null", "null"),
        ("1.5", "1.5", "a float"),
        ("2001-01-01", "2001-01-01", "a date"),
    ],
)
def test_a_key_yaml_reads_as_no_text_is_refused_with_a_hint_to_quote_it(
    tmp_path: Path, key: str, shown: str, kind: str
) -> None:
    message = schema_error(write(tmp_path, f"observations:\n  {key}:\n    type: int\n"))
    assert message == (
        f"invalid schema: observations: the name {shown} is read by YAML as {kind}"
        + (" (unquoted yes/no/on/off/true/false)" if kind == "a boolean" else "")
        + ", not as text; quote it to use it as an observation name"
    )


def test_a_date_key_is_refused_after_a_library_changed_pyyamls_safe_loader(tmp_path: Path) -> None:
    """vLLM's dependency lm-format-enforcer makes ``yaml.SafeLoader`` read dates as text, for the
    whole process, on import; the schema's own loader keeps reading them as dates."""
    import lmformatenforcer.external.jsonschemaobjectutil  # noqa: F401  (the import is the change)

    assert yaml.safe_load("2001-01-01: 1") == {"2001-01-01": 1}
    message = schema_error(write(tmp_path, "observations:\n  2001-01-01:\n    type: int\n"))
    assert "the name 2001-01-01 is read by YAML as a date" in message


def test_a_key_yaml_reads_as_no_text_in_a_named_policy(tmp_path: Path) -> None:
    message = schema_error(write(tmp_path, "policies:\n  grid:\n    observations:\n      1: {type: int}\n"))
    assert message.startswith("invalid schema: policies.grid.observations: the name 1 is read by YAML as an integer")


@pytest.mark.parametrize("key,problem", [('""', "cannot be empty"), ('"\\ud800"', "not valid Unicode")])
def test_an_empty_or_invalid_unicode_name_is_refused(tmp_path: Path, key: str, problem: str) -> None:
    message = schema_error(write(tmp_path, f"observations:\n  {key}:\n    type: int\n"))
    assert message.startswith("invalid schema: observations: ") and problem in message


@pytest.mark.parametrize("name", ["pos.x", "a b", "x-y", "größe", "schema", "model_config", "_id", "'1'", "'yes'"])
def test_any_text_is_an_observation_name(tmp_path: Path, name: str) -> None:
    policy = load_schema(write(tmp_path, f"observations:\n  {name}:\n    type: int\n")).policies["default"]
    assert policy.observations is not None and list(policy.observations) == [name.strip("'")]


def test_list_of_bool_is_an_observation_type(tmp_path: Path) -> None:
    text = "observations:\n  actionMask:\n    type: List[bool]\n    min_items: 4\n    max_items: 4\n"
    policy = load_schema(write(tmp_path, text)).policies["default"]
    assert policy.observations is not None and policy.observations["actionMask"].width == 4
    assert "List[bool]" in OBSERVATION_TYPES


# --- Gymnasium observation spaces ------------------------------------------------------------


def test_an_observation_space_loads_top_level_and_per_policy(tmp_path: Path) -> None:
    single = load_schema(write(tmp_path, """\
        observation_space: {type: box, shape: [84, 84, 4], dtype: uint8, low: 0, high: 255}
        """))
    assert single.policies["default"].observation_space == {"type": "box", "shape": [84, 84, 4], "dtype": "uint8"}
    assert single.policies["default"].observations is None
    named = load_schema(write(tmp_path, """\
        policies:
          robot:
            observation_space:
              type: dict
              spaces: {speed: {type: box, shape: [1], low: -1, high: 1}, gear: {type: discrete, n: 5}}
        """))
    assert list(named.policies["robot"].observation_space["spaces"]) == ["gear", "speed"]  # Gymnasium's order
    assert named.public()["policies"]["robot"]["observation_space"]["spaces"]["gear"] == {"type": "discrete", "n": 5}


def test_an_action_mask_may_name_a_key_of_a_dict_observation_space(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = export_module(MLPPolicy(2, [4], nvec=[3]), 2, tmp_path / "models" / "masked.pt2")
    spaces = "{pos: {type: box, shape: [2]}, legal: {type: multi_binary, n: 3}}"
    policy = load_schema(write(tmp_path, f"""\
        observation_space: {{type: dict, spaces: {spaces}}}
        parameters: {{model: {model}, action_space: {{type: discrete, n: 3, mask: legal}}}}
        """)).policies["default"]
    served, _ = resolve_policy(policy)
    assert served.mask_key == "legal" and served.obs_shape == (2,)
    missing = load_schema(write(tmp_path, f"""\
        observation_space: {{type: dict, spaces: {spaces}}}
        parameters: {{model: {model}, action_space: {{type: discrete, n: 3, mask: nope}}}}
        """)).policies["default"]
    with pytest.raises(SchemaError, match=r"^parameters.action_space.mask: 'nope'"):
        resolve_policy(missing)


def test_an_observation_space_is_refused_beside_observations_or_invalid(tmp_path: Path) -> None:
    both = write(tmp_path, """\
        observations: {x: {type: float}}
        observation_space: {type: discrete, n: 3}
        """)
    assert schema_error(both).startswith("observation_space: give either `observations` (Pathmind's fields) or "
                                         "`observation_space`")
    named = write(tmp_path, """\
        policies:
          p: {observations: {x: {type: float}}, observation_space: {type: discrete, n: 3}}
        """)
    assert schema_error(named).startswith("policies.p.observation_space: give either `observations`")
    top = write(tmp_path, """\
        observation_space: {type: discrete, n: 3}
        policies: {p: {observation_space: {type: discrete, n: 3}}}
        """)
    assert schema_error(top) == "observation_space: with `policies`, give observation_space per policy"
    bad = write(tmp_path, """\
        policies: {p: {observation_space: {type: box, shape: [2], dtype: uint8, high: 256}}}
        """)
    assert schema_error(bad) == "policies.p.observation_space.high: 256 is outside the range of uint8 [0, 255]"

"""Shared fixtures: tiny policies of every kind, one Ray per session, a real uvicorn server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from support import wait_until
from torch import nn

from policy_server.export import MLPPolicy, export_module
from policy_server.net import bound_socket, free_port
from policy_server.settings import Settings

API_KEY = "test-key-123"
LPOC_OBSERVATIONS = {
    "id": {"type": "int"},
    "coordinates_0": {"type": "int"},
    "coordinates_1": {"type": "int"},
    **{
        f"{kind}_{side}_{what}": {"type": "bool"}
        for side in ("up", "right", "down", "left")
        for kind, what in (("has", "neighbour"), ("is", "free"))
    },
}
LPOC_OBS = {name: (1 if spec["type"] == "int" else True) for name, spec in LPOC_OBSERVATIONS.items()}
TUPLE_OBSERVATIONS = {"speed": {"type": "float"}, "sensors": {"type": "List[float]", "min_items": 3, "max_items": 3}}
TUPLE_OBS = {"speed": 0.5, "sensors": [0.1, -0.2, 0.3]}
BOX_OBSERVATIONS = {"x": {"type": "float"}, "y": {"type": "float"}, "flag": {"type": "bool"}}
BOX_OBS = {"x": 0.1, "y": -0.3, "flag": False}
FAULTY_OBSERVATIONS = {"a": {"type": "float"}, "b": {"type": "float"}}
CART_OBSERVATIONS = {
    name: {"type": "float"} for name in ("cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity")
}


MACHINE_SETTINGS = ("SCHEMA_PATH", "RAY_ADDRESS")
"""Variables, besides ``POLICY_SERVER_*``, through which a machine's own setup reaches the server."""
_saved_environ: dict[str, str] = {}
_scratch_home: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """The suite sees what it sets up, never what this machine happens to have: none of the
    server's settings from the environment or a ``.env`` (a user's own, gitignored), and empty
    caches (``XDG_CACHE_HOME``: the client SDKs; ``HF_HOME``: Hugging Face) with downloads off,
    so a test that needs a cached SDK or hub model fails everywhere, not only on a fresh machine.
    Runs before collection, so before transformers reads ``HF_HOME``."""
    _saved_environ.update(os.environ)
    for name in list(os.environ):
        if name.startswith("POLICY_SERVER_") or name in MACHINE_SETTINGS:
            del os.environ[name]
    home = tempfile.mkdtemp(prefix="policy-server-tests-")
    _scratch_home.append(home)
    os.environ.update(XDG_CACHE_HOME=f"{home}/cache", HF_HOME=f"{home}/huggingface", HF_HUB_OFFLINE="1")
    # in this process; a server a test starts as a subprocess in the repository still reads a .env there
    Settings.model_config["env_file"] = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building ``llm_dirs``'s tiny models at once in a process of their own when a collected
    test needs them: their 400 training steps take 40 s of one core, which the first tests of the
    run (servers starting, mostly waiting) leave free; the fixture then waits for what is left."""
    if not session.config.option.collectonly and any("llm_dirs" in item.fixturenames for item in session.items):
        _tiny_build.append(TinyModelBuild(Path(_scratch_home[0]) / "llm"))


def pytest_unconfigure(config: pytest.Config) -> None:
    for build in _tiny_build:
        build.stop()
    os.environ.clear()
    os.environ.update(_saved_environ)
    for home in _scratch_home:
        shutil.rmtree(home, ignore_errors=True)


class Faulty(nn.Module):
    """Raises at run time when an input exceeds 1000: stands for a model that breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] > 1000).any()):
            raise RuntimeError("boom: input out of range")
        return self.lin(x)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model files of a discrete, a tuple, a box and a faulty policy (fixed seeds)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    export_module(MLPPolicy(11, [16], nvec=[4]), 11, root / "lpoc.pt", fmt="torchscript")
    export_module(MLPPolicy(4, [16], nvec=[3, 2]), 4, root / "tuple.pt2", fmt="export")
    export_module(MLPPolicy(3, [16], box_dim=2), 3, root / "box.pt2")
    export_module(MLPPolicy(4, [32], nvec=[2]), 4, root / "cart.pt2")
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13; still served
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Faulty()), root / "faulty.pt")
    return root


def fixed_action_model(path: Path, action: int, obs_dim: int = 11, n: int = 4, hidden: int = 16) -> Path:
    """A discrete policy whose logits prefer ``action`` by 20 nats whatever it sees: its samples
    and its most likely action are ``action`` (but for 1 in 10^8). Canary tests tell versions apart by it."""
    module = MLPPolicy(obs_dim, [hidden], nvec=[n])
    with torch.no_grad():
        module.heads[0].weight.zero_()
        module.heads[0].bias.copy_(torch.nn.functional.one_hot(torch.tensor(action), n).float() * 20)
    return export_module(module, obs_dim, path)


def multi_policy_schema(model_dir: Path, **parameters: Any) -> dict[str, Any]:
    """One schema with all four policies; lpoc is the default (plain paths)."""
    small = {"num_cpus": 0.1}
    return {
        "parameters": {"api_key": API_KEY, "default_policy": "lpoc", **parameters},
        "policies": {
            "lpoc": {
                "observations": LPOC_OBSERVATIONS,
                "discrete": True,
                "tuple": False,
                "model": str(model_dir / "lpoc.pt"),
                "action_space": {"type": "discrete", "n": 4, "names": ["up", "right", "down", "left"]},
                "resources": small,
            },
            "tuple": {
                "observations": TUPLE_OBSERVATIONS,
                "model": str(model_dir / "tuple.pt2"),
                "action_space": {"type": "tuple", "nvec": [3, 2]},
                "resources": small,
            },
            "box": {
                "observations": BOX_OBSERVATIONS,
                "model": str(model_dir / "box.pt2"),
                "action_space": {"type": "box", "shape": [2], "low": -0.5, "high": 0.5},
                "resources": small,
            },
            "faulty": {
                "observations": FAULTY_OBSERVATIONS,
                "model": str(model_dir / "faulty.pt"),
                "resources": small,
            },
        },
    }


def training_schema(model_dir: Path, checkpoint_dir: Path, **training: Any) -> dict[str, Any]:
    """A trainable CartPole policy `cart` (the default) beside the untrained `lpoc` policy."""
    plain = multi_policy_schema(model_dir)["policies"]["lpoc"]
    return {
        "parameters": {"api_key": API_KEY, "default_policy": "cart"},
        "policies": {
            "cart": {
                "observations": CART_OBSERVATIONS,
                "model": str(model_dir / "cart.pt2"),
                "action_space": {"type": "discrete", "n": 2, "names": ["left", "right"]},
                "resources": {"num_cpus": 0.1},
                "training": {"checkpoint_dir": str(checkpoint_dir), "num_cpus": 0.1, "seed": 0, **training},
            },
            "lpoc": plain,
        },
    }


def cart_fragment(version: int = 0, steps: int = 16, seed: int | None = None, **over: Any) -> dict[str, Any]:
    """An episode fragment of `steps` CartPole-shaped steps on the wire (terminated at its end);
    `over` replaces fields. The random observations and actions are seeded by `seed` (default: `steps`)."""
    rng = np.random.default_rng(steps if seed is None else seed)
    return {
        "model_version": version,
        "observations": rng.uniform(-0.05, 0.05, (steps + 1, 4)).tolist(),
        "actions": rng.integers(0, 2, steps).tolist(),
        "rewards": [1.0] * steps,
        "log_probs": [-0.69] * steps,
        "terminated": True,
    } | over


# --- issue 11: what users send ------------------------------------------------------------------

BIG_INT = 10**400  # "1 followed by 400 zeros": no float holds it
BAD_POLICY_INPUTS: dict[str, tuple[str, bytes, str]] = {
    # numbers that overflow the models' float32 input, integers float32 cannot hold exactly, and
    # JSON strings or booleans where numbers or booleans belong: (path, body, the field named)
    "1e39 float": ("/policies/box/predict", json.dumps(BOX_OBS | {"x": 1e39}).encode(), "body.x"),
    "-1e39 in a float list": (
        "/policies/tuple/predict", json.dumps(TUPLE_OBS | {"sensors": [0.1, -1e39, 0.3]}).encode(), "body.sensors.1"
    ),
    "3.4028236e38 rounds to inf": ("/policies/box/predict", json.dumps(BOX_OBS | {"y": 3.4028236e38}).encode(), "body.y"),
    "1e999 is inf in JSON": ("/policies/box/predict", b'{"x": 1e999, "y": 0, "flag": true}', "body.x"),
    "10**400 int": ("/predict", json.dumps(LPOC_OBS | {"id": BIG_INT}).encode(), "body.id"),
    "-(10**400) int": ("/predict", json.dumps(LPOC_OBS | {"coordinates_1": -BIG_INT}).encode(), "body.coordinates_1"),
    "2**24+1 int": ("/predict", json.dumps(LPOC_OBS | {"coordinates_0": 2**24 + 1}).encode(), "body.coordinates_0"),
    "true as int": ("/predict", json.dumps(LPOC_OBS | {"id": True}).encode(), "body.id"),
    "'5' as int": ("/predict", json.dumps(LPOC_OBS | {"id": "5"}).encode(), "body.id"),
    "'yes' as bool": ("/predict", json.dumps(LPOC_OBS | {"is_up_free": "yes"}).encode(), "body.is_up_free"),
    "'off' as bool": ("/predict", json.dumps(LPOC_OBS | {"is_up_free": "off"}).encode(), "body.is_up_free"),
    "1 as bool": ("/predict", json.dumps(LPOC_OBS | {"has_up_neighbour": 1}).encode(), "body.has_up_neighbour"),
    "'0.5' as float": ("/policies/box/predict", json.dumps(BOX_OBS | {"x": "0.5"}).encode(), "body.x"),
    "false as float": ("/policies/tuple/predict", json.dumps(TUPLE_OBS | {"sensors": [False, 0, 0]}).encode(), "body.sensors.0"),
    "1e39 raw": ("/predict_raw", json.dumps({"obs": [1e39] + [0.0] * 10}).encode(), "body.obs.0"),
    "10**400 raw": ("/predict_raw", json.dumps({"obs": [0.0] * 10 + [BIG_INT]}).encode(), "body.obs.10"),
    "'1' raw": ("/predict_raw", json.dumps({"obs": ["1"] + [0.0] * 10}).encode(), "body.obs.0"),
    "1e39 in a raw batch row": (
        "/predict_raw/batch", json.dumps({"obs": [[0.0] * 11, [0.0] * 3 + [1e39] + [0.0] * 7]}).encode(), "body.obs.1.3"
    ),
    "10**400 in a batch": (
        "/predict/batch", json.dumps({"observations": [LPOC_OBS, LPOC_OBS | {"id": BIG_INT}]}).encode(),
        "body.observations.1.id",
    ),
}

# Pathmind's examples/lpoc_tuple schema: twelve one-hot List[int] observations with no
# min_items/max_items, discrete tuple actions; here each list has 5 items (60 inputs in all).
ONEHOT_OBSERVATIONS = {
    f"table_{table}_{kind}": {"type": "List[int]"} for kind in ("node", "target_node") for table in range(1, 7)
}
ONEHOT_OBS = {name: [int(i % 5 == j) for j in range(5)] for i, name in enumerate(ONEHOT_OBSERVATIONS)}
# names that are no Python identifiers or that BaseModel already uses, and Pathmind's action mask
ODD_OBSERVATIONS = {
    "pos.x": {"type": "float"},
    "schema": {"type": "int"},
    "a b": {"type": "bool"},
    "größe": {"type": "float"},
    "_id": {"type": "int"},
    "1": {"type": "int"},
    "model_config": {"type": "float"},
    "actionMask": {"type": "List[bool]", "min_items": 4, "max_items": 4},
}
ODD_OBS = {"pos.x": 0.5, "schema": 2, "a b": True, "größe": -1.5, "_id": 7, "1": 1, "model_config": 0.0,
           "actionMask": [True, False, True, True]}


@pytest.fixture(scope="session")
def inputs_models(model_dir: Path) -> Path:
    """``model_dir`` with the models of ``inputs_schema``'s `onehot` (60 → tuple 6×5) and `odd` (11 → 4)."""
    torch.manual_seed(0)
    export_module(MLPPolicy(60, [16], nvec=[6, 5]), 60, model_dir / "onehot.pt2")
    export_module(MLPPolicy(11, [16], nvec=[4]), 11, model_dir / "odd.pt2")
    return model_dir


def inputs_schema(model_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    """Pathmind's one-hot policy (`onehot`), odd names with an action mask (`odd`) and the
    trainable CartPole policy (`cart`, the default); ``model_dir`` from the ``inputs_models`` fixture."""
    schema = training_schema(model_dir, checkpoint_dir)
    small = {"num_cpus": 0.1}
    schema["policies"] = {
        "cart": schema["policies"]["cart"],
        "onehot": {"observations": ONEHOT_OBSERVATIONS, "discrete": True, "tuple": True,
                   "model": str(model_dir / "onehot.pt2"), "resources": small},
        "odd": {"observations": ODD_OBSERVATIONS, "model": str(model_dir / "odd.pt2"), "resources": small},
    }
    return schema


@pytest.fixture()
def write_schema(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(doc: dict[str, Any], name: str = "schema.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def ray_session() -> Iterator[int]:
    """One local Ray (and Serve, proxies off) for the whole test session; yields its metrics port."""
    import ray
    from ray import serve

    port = free_port()
    # "local": a new Ray, never one this machine already runs (`ray start`), which ray.init() would join
    # metrics every 2 s instead of Ray's 10: the tests that read Ray's export wait for it (a gauge
    # not re-exported within 2 intervals, 4 s, leaves the export; a live one is re-exported each interval)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 2000})
    serve.start(proxy_location="Disabled")
    yield port
    serve.shutdown()
    ray.shutdown()


@contextmanager
def running_server(app: Any, start_timeout_s: float = 120) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on a free port in a thread; yields the base URL.

    ``start_timeout_s`` bounds the app's start-up, which waits for every Serve app it deploys.

    The socket is bound here and handed to uvicorn, so no other process (a Ray worker picking
    ports, say) can take the port between choosing it and listening on it.
    """
    import uvicorn

    sock = bound_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited while starting")
        return server.started

    wait_until(started, start_timeout_s, message="uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


TINY_BUILD: dict[str, Any] = {"seed": 0, "lora": True, "extra_loras": 1}
"""``build_tiny_model.build``'s arguments for ``llm_dirs``."""


class TinyModelBuild:
    """``build_tiny_model.build(out_dir, **TINY_BUILD)`` in a child Python process, started now;
    ``paths()`` waits for it. A process, not a thread: the build sets torch's thread count, which
    is the whole process's, and its Python would hold the tests' GIL."""

    def __init__(self, out_dir: Path) -> None:
        script = Path(__file__).parents[1] / "examples" / "llm" / "build_tiny_model.py"
        code = (
            "import importlib.util, json, os, sys\n"
            "os.nice(10)  # the CPU the tests leave; all of it while a test waits for it\n"
            "from pathlib import Path\n"
            "spec = importlib.util.spec_from_file_location('build_tiny_model', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "paths = module.build(Path(sys.argv[2]), **json.loads(sys.argv[3]))\n"
            "print(json.dumps({key: str(path) for key, path in paths.items()}))\n"
        )
        out_dir.mkdir(parents=True)
        self.log = out_dir / "build.log"
        with self.log.open("wb") as log:  # a file, not a pipe: its progress bars never block it
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, str(script), str(out_dir), json.dumps(TINY_BUILD)],
                stdout=subprocess.PIPE, stderr=log,
            )

    def paths(self) -> dict[str, Path]:
        """The built folders by key (as ``build`` returns them); fails with the child's stderr if it failed."""
        # waited for: back to the tests' priority, or a loaded machine's other processes starve it
        # (raising a priority needs CAP_SYS_NICE; without it the build finishes niced, as it ran)
        with contextlib.suppress(PermissionError, ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, self.process.pid, os.getpriority(os.PRIO_PROCESS, 0))
        out, _ = self.process.communicate()
        if self.process.returncode != 0:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building the tiny models failed ({self.process.returncode}):\n{tail}")
        return {key: Path(path) for key, path in json.loads(out.decode().splitlines()[-1]).items()}

    def stop(self) -> None:
        """Kill the build if no test waited for it to the end (a run stopped early)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


_tiny_build: list[TinyModelBuild] = []
"""The build ``pytest_collection_finish`` started, if any."""


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama policy, value model and LoRA adapters (`policy_lora`, `policy_lora_1`) built once per
    session (examples/llm/build_tiny_model.py): by the build started after collection, or here when
    no collected test named the fixture (one that asks for it by ``request.getfixturevalue``)."""
    if _tiny_build:
        return _tiny_build[0].paths()
    return build_tiny_model().build(tmp_path_factory.mktemp("llm"), **TINY_BUILD)


def build_tiny_model() -> Any:
    """examples/llm/build_tiny_model.py as a module (the examples are not a package)."""
    import importlib.util

    script = Path(__file__).parents[1] / "examples" / "llm" / "build_tiny_model.py"
    spec = importlib.util.spec_from_file_location("build_tiny_model", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def policy_engine(llm_dirs: dict[str, Path]) -> Iterator[Any]:
    """The transformers engine of the plain tiny policy, in this process (a test may change its weights)."""
    from policy_server.llm.engine import LLMEngine
    from policy_server.schema.llm import LLMPolicySpec

    spec = LLMPolicySpec(path=llm_dirs["policy"])
    engine = LLMEngine(spec, spec.path, None, "cpu")
    yield engine
    engine.close()


def llm_schema(llm_dirs: dict[str, Path], **limits: Any) -> dict[str, Any]:
    return {
        "parameters": {"api_key": API_KEY},
        "llm": {
            # the transformers engine: a vLLM engine takes a minute of two cores to start, so the
            # tests that need one share the session's (``vllm_server``; tests/llm/test_vllm_engine.py
            # holds the engine itself)
            "policy": {"path": str(llm_dirs["policy"]), "served_name": "tiny", "engine": "transformers",
                       "limits": {"max_new_tokens": 64, **limits}},
            "value": {"path": str(llm_dirs["value"])},
        },
    }


def vllm_adapters(llm_dirs: dict[str, Path]) -> dict[str, str]:
    """The extra model ids of ``vllm_server``: two LoRA adapters with different weights on the tiny policy."""
    return {"tiny-lora-a": str(llm_dirs["policy_lora"]), "tiny-lora-b": str(llm_dirs["policy_lora_1"])}


@pytest.fixture(scope="session")
def vllm_server(llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of one server of ``llm_schema`` on the vLLM engine (local backend), shared by
    the whole test session: an engine start costs about a minute of two cores. Tests must leave
    its weights as they found them."""
    from policy_server.gateway.app import build_app
    from policy_server.settings import Settings

    schema = llm_schema(llm_dirs)
    schema["llm"]["policy"] |= {
        "engine": "vllm",
        "adapters": vllm_adapters(llm_dirs),
        "training": {"save_dir": str(tmp_path_factory.mktemp("vllm-training"))},  # GRPO's runs
        "weight_transfer": "gloo",  # GRPO publishes straight into vLLM's worker (auto: set_weights on CPU)
    }
    path = tmp_path_factory.mktemp("vllm-server") / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    with running_server(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0))) as url:
        yield url


def make_client(tmp_path: Path, schema: dict[str, Any]) -> Any:
    """A TestClient (not entered) of the app of ``schema``, on the local backend, with the api key."""
    from fastapi.testclient import TestClient

    from policy_server.gateway.app import build_app

    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return TestClient(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0)), headers={"access-token": API_KEY})


def post_raw(client: Any, path: str, body: Any) -> Any:
    """POST ``body`` as JSON with ASCII escapes: a lone surrogate travels as ``\\ud800`` (valid JSON,
    not valid Unicode) and NaN as the bare token ``NaN`` that Python's JSON reader accepts."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def assert_422_naming(answer: Any, field: str) -> dict[str, Any]:
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["fields"][0]["field"] == field, error
    return error


CHAT_BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def train_sb3(algorithm: str, env: Any, path: Path, steps: int, **kwargs: Any) -> Path:
    """Train an SB3 (or sb3-contrib) ``algorithm`` for a handful of ``steps`` on CPU, seeded, and
    save it to ``path`` (a ``.zip``): a real file for the format tests, made in about a second."""
    import sb3_contrib
    import stable_baselines3

    cls = getattr(stable_baselines3, algorithm, None) or getattr(sb3_contrib, algorithm)
    model = cls("MlpLstmPolicy" if algorithm == "RecurrentPPO" else "MlpPolicy", env, seed=0, device="cpu", **kwargs)
    model.learn(steps)
    model.save(path)
    return path


@pytest.fixture(scope="session")
def format_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PPO CartPole ``.zip`` (``ppo``) and the ``cart.pt2`` architecture as ONNX (``onnx``,
    with its torch twin ``onnx_twin``, a ``.pt2`` of the same weights)."""
    root = tmp_path_factory.mktemp("formats")
    ppo = train_sb3("PPO", "CartPole-v1", root / "ppo.zip", 64, n_steps=32, batch_size=32, n_epochs=1)
    torch.manual_seed(0)
    module = MLPPolicy(4, [32], nvec=[2])
    return {"ppo": ppo, "onnx": export_module(module, 4, root / "cart", fmt="onnx"),
            "onnx_twin": export_module(module, 4, root / "cart")}

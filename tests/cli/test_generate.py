"""generate.py and the functions behind it (policy_server.cli)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import torch
import yaml
from conftest import multi_policy_schema
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from policy_server import cli
from policy_server.errors import Conflict, SchemaError
from policy_server.export import MLPPolicy
from policy_server.gateway.app import build_app
from policy_server.launch import start_server, stop_server, wait_ready
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/schema.yaml"))


def fresh_example(name: str, root: Path) -> Path:
    """examples/<name> as a fresh clone has it: without the models/ (gitignored) a previous build
    left in this checkout, and without runs/."""
    ignored = ("runs", "__pycache__") + (("models",) if name in cli.EXAMPLE_BUILDERS else ())
    return Path(shutil.copytree(ROOT / "examples" / name, root / "examples" / name,
                                ignore=shutil.ignore_patterns(*ignored)))


LOAD_SCRIPT = cli._load_script
PRETRAIN_SECONDS = 2.0
"""examples/alphabetical's pre-training here: what a copy must do (build, pre-train, save, report)
takes as long as it is given, and the served folder is the same kind after 2 s as after 20 s."""
TINY_TRAIN_STEPS = 40
"""examples/llm's tiny model trains this many steps here (400 for a user): the same build, bar and
folders, a tenth of the wall time."""


def short_pretraining(path: Path) -> ModuleType:
    """``cli._load_script`` with examples/alphabetical/pretrain.py's ``Args`` defaulting to
    ``PRETRAIN_SECONDS`` of pre-training and 10 held-out problems, and examples/llm's
    build_tiny_model.py training ``TINY_TRAIN_STEPS``: their ``build_models`` and ``pretrain`` run as
    they are, for less wall time (20 s and 100 greedy decodes, and 400 steps, otherwise); the
    tiny model examples/alphabetical pre-trains is built with ``TINY_TRAIN_STEPS`` too."""
    module = LOAD_SCRIPT(path)
    if path.name == "build_tiny_model.py":
        module.build = functools.partial(module.build, train_steps=TINY_TRAIN_STEPS)
    if path.name == "pretrain.py":
        @dataclasses.dataclass
        class Args(module.Args):  # type: ignore[name-defined]
            seconds: float = PRETRAIN_SECONDS
            eval_problems: int = 10

        module.Args = Args
        load_builder = module.load_builder  # the tiny model it starts from: TINY_TRAIN_STEPS too

        def short_builder() -> ModuleType:
            builder = load_builder()
            builder.build = functools.partial(builder.build, train_steps=TINY_TRAIN_STEPS)
            return builder

        module.load_builder = short_builder
    return module


@pytest.fixture(scope="module")
def copied(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, str]]:
    """``copy_server_files`` of each example into its own folder, once per module:
    the folder and what the command wrote to stderr (its progress bar). examples/alphabetical
    pre-trains for ``PRETRAIN_SECONDS``."""
    done: dict[str, tuple[Path, str]] = {}

    def copy(name: str) -> tuple[Path, str]:
        if name not in done:
            root = tmp_path_factory.mktemp(f"copied-{name}")
            (root / "served").mkdir()
            with contextlib.redirect_stderr(io.StringIO()) as err, pytest.MonkeyPatch.context() as patch:
                patch.setattr(cli, "_load_script", short_pretraining)
                message = cli.copy_server_files(str(fresh_example(name, root)), str(root / "served"))
            assert f"SCHEMA_PATH={(root / 'served' / 'schema.yaml').resolve()} uvicorn app:app" in message
            done[name] = root / "served", err.getvalue()
        return done[name]

    return copy


def api_key(schema: Path) -> str:
    return str(yaml.safe_load(schema.read_text())["parameters"]["api_key"])


def one_answer(client: httpx.Client | TestClient, schema: Path) -> dict[str, Any]:
    """A chat completion from the schema's LLM, or an action of its default policy for zero
    observations (as many as its model takes)."""
    if "llm" in yaml.safe_load(schema.read_text()):
        body = {"messages": [{"role": "user", "content": "Sort these letters: b a"}], "max_tokens": 4}
        answer = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key(schema)}"})
    else:
        width = cli.check(str(schema))["policies"]["default"]["obs_dim"]
        answer = client.post("/predict_raw", json={"obs": [0.0] * width}, headers={"access-token": api_key(schema)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def on_transformers(schema: Path) -> Path:
    """The schema with its LLM policy (if any) on the transformers engine."""
    doc = yaml.safe_load(schema.read_text())
    if "llm" in doc:
        doc["llm"]["policy"]["engine"] = "transformers"
        schema.write_text(yaml.safe_dump(doc, sort_keys=False))
    return schema


# examples/llm's copy serves on its vLLM engine through uvicorn in the next test: one engine start,
# not two; the others' LLMs (examples/alphabetical's) serve here on the transformers engine
@pytest.mark.parametrize("example", [name for name in EXAMPLES if name != "llm"])
def test_every_example_copies_into_a_folder_that_serves(
    copied: Callable[[str], tuple[Path, str]], example: str
) -> None:
    served, _ = copied(example)
    schema = on_transformers(served / "schema.yaml")
    settings = Settings(schema_path=schema, backend="local", gateway_metrics_port=0, seed=0)
    with TestClient(build_app(settings)) as client:
        answer = one_answer(client, served / "schema.yaml")
    assert answer["choices"][0]["message"]["role"] == "assistant" if "choices" in answer else answer["action"] >= 0


def test_the_copied_llm_example_is_built_with_a_progress_bar_and_uvicorn_serves_it(
    copied: Callable[[str], tuple[Path, str]], tmp_path: Path
) -> None:
    served, progress = copied("llm")
    assert "training the tiny model" in progress and f"{TINY_TRAIN_STEPS}/{TINY_TRAIN_STEPS}" in progress, progress
    for folder in ("policy", "value", "policy-lora"):
        assert (served / "models" / folder).is_dir()
    process, url = start_server(served / "schema.yaml", "local", tmp_path / "uvicorn.log")
    try:
        wait_ready(url, process, tmp_path / "uvicorn.log", timeout_s=180)
        with httpx.Client(base_url=url, timeout=60) as client:
            answer = one_answer(client, served / "schema.yaml")
    finally:
        stop_server(process)
    assert answer["model"] == "tiny-llama" and answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_unbuilt_llm_example_names_the_command_that_builds_it(tmp_path: Path) -> None:
    example = fresh_example("llm", tmp_path)
    settings = Settings(schema_path=example / "schema.yaml", backend="local", gateway_metrics_port=0)
    out_dir = example / "models"
    with pytest.raises(SchemaError, match=rf"llm\.policy\.path: .* is no such folder .*"
                                          rf"`python examples/llm/build_tiny_model.py --out-dir {out_dir}`"):
        build_app(settings)


def test_copy_server_files_copies_an_example_next_to_app(tmp_path: Path) -> None:
    message = cli.copy_server_files(str(ROOT / "examples" / "lpoc"), str(tmp_path))
    assert "uvicorn app:app" in message
    assert (tmp_path / "schema.yaml").read_text() == (ROOT / "examples/lpoc/schema.yaml").read_text()
    described = cli.check(str(tmp_path / "schema.yaml"))["policies"]
    assert described["default"]["obs_dim"] == 11
    assert described["default"]["action_space"]["n"] == 4


def test_copy_server_files_keeps_a_schema_of_the_users_own_unless_forced(tmp_path: Path) -> None:
    cli.copy_server_files(str(ROOT / "examples" / "lpoc"), str(tmp_path))
    cli.copy_server_files(str(ROOT / "examples" / "cartpole"), str(tmp_path))  # an example's: replaced
    own = (tmp_path / "schema.yaml").read_text().replace("api_key", "url_path: mine\n  api_key", 1)
    (tmp_path / "schema.yaml").write_text(own)
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    with pytest.raises(Conflict, match=r"schema\.yaml is no example's schema .*--force"):
        cli.copy_server_files(str(ROOT / "examples" / "lpoc"), str(tmp_path))
    assert (tmp_path / "schema.yaml").read_text() == own
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == models
    cli.copy_server_files(str(ROOT / "examples" / "lpoc"), str(tmp_path), force=True)
    assert (tmp_path / "schema.yaml").read_text() == (ROOT / "examples/lpoc/schema.yaml").read_text()


def test_copy_server_files_names_the_examples_when_the_folder_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="examples/cartpole"):
        cli.copy_server_files(str(tmp_path / "nope"), str(tmp_path))


def test_export_from_a_state_dict_and_mlp_spec_writes_a_checked_schema(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = MLPPolicy(5, [8], nvec=[3])
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    out = cli.export(
        str(tmp_path / "models" / "policy"), obs_dim=5, state_dict=str(tmp_path / "weights.pt"),
        hidden=(8,), nvec=3, schema=str(tmp_path / "schema.yaml"), action_names=("a", "b", "c"),
    )
    x = torch.randn(4, 5)
    expected = trained(x).detach().numpy()
    assert TorchPolicy.from_file(Path(out)).forward(x.numpy()).heads[0] == pytest.approx(expected, abs=1e-6)
    described = cli.check(str(tmp_path / "schema.yaml"))["policies"]["default"]
    assert described["action_space"] == {"type": "discrete", "n": 3, "names": ["a", "b", "c"]}


def test_export_a_user_module_from_its_factory(tmp_path: Path) -> None:
    factory = tmp_path / "my_policy.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, 2))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        out = cli.export(str(tmp_path / "user.pt2"), obs_dim=3, module="my_policy:make", fmt="export",
                         schema=str(tmp_path / "schema.yaml"))
    finally:
        sys.path.remove(str(tmp_path))
    assert Path(out).suffix == ".pt2"
    assert cli.check(str(tmp_path / "schema.yaml"))["policies"]["default"]["obs_dim"] == 3


def test_check_refuses_a_schema_that_contradicts_its_model(tmp_path: Path) -> None:
    cli.export(str(tmp_path / "models" / "p"), obs_dim=4, nvec=2, schema=str(tmp_path / "schema.yaml"))
    text = (tmp_path / "schema.yaml").read_text().replace("n: 2", "n: 3")
    (tmp_path / "schema.yaml").write_text(text)
    with pytest.raises(SchemaError, match=r"parameters\.action_space\.n: .*3.*2"):
        cli.check(str(tmp_path / "schema.yaml"))


def test_check_refuses_a_canary_that_start_up_would_refuse(tmp_path: Path) -> None:
    cli.export(str(tmp_path / "models" / "p"), obs_dim=4, nvec=2, schema=str(tmp_path / "schema.yaml"))
    cli.export(str(tmp_path / "wide"), obs_dim=5, nvec=2)
    doc = yaml.safe_load((tmp_path / "schema.yaml").read_text())
    doc["parameters"]["canary"] = {"model": "wide.pt2", "share": 0.5}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(SchemaError, match=r"parameters\.canary\.model: wide\.pt2: .*width 5"):
        cli.check(str(tmp_path / "schema.yaml"))


def test_check_reports_what_the_schema_asks_against_this_machine(tmp_path: Path) -> None:
    cli.export(str(tmp_path / "models" / "p"), obs_dim=4, nvec=2, schema=str(tmp_path / "schema.yaml"))
    text = (tmp_path / "schema.yaml").read_text() + "  resources: {num_replicas: 2, num_cpus: 64}\n"
    (tmp_path / "schema.yaml").write_text(text)
    report = cli.check(str(tmp_path / "schema.yaml"))["resources"]
    assert report["asks"] == [{"field": "parameters.resources", "what": "policy default's replicas", "replicas": 2,
                               "num_cpus": 64, "num_gpus": 0}]
    assert report["total"] == {"CPU": 128, "GPU": 0} and report["machine"] == cli.local_machine()
    assert report["machine"]["CPU"] >= 1 and report["machine"]["memory"] > 2**20
    assert report["does_not_fit"].startswith("the schema asks Ray for 128 CPUs and the cluster has ")


def test_check_refuses_an_llm_folder_that_cannot_be_served(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(llm_dirs["policy"], tmp_path / "policy"))
    (folder / "tokenizer.json").unlink()
    schema = {"llm": {"policy": {"path": str(folder), "engine": "transformers"}}}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    with pytest.raises(SchemaError, match=rf"llm\.policy\.path: {folder}: no tokenizer"):
        cli.check(str(tmp_path / "schema.yaml"))


def test_check_describes_the_llm_models_it_checked_and_prints_them_alone(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An LLM-only schema on the vLLM engine: `generate.py check` prints each model's folder,
    engine, dtype, model id, size and adapters, and nothing on stderr (vLLM's import is quiet)."""
    policy = {"path": str(llm_dirs["policy"]), "engine": "vllm", "served_name": "tiny", "dtype": "bfloat16",
              "adapters": {"tiny-a": str(llm_dirs["policy_lora"])}}
    value = {"path": str(llm_dirs["value"]), "training": {"save_dir": str(tmp_path / "trained")}}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({"llm": {"policy": policy, "value": value}}))
    done = subprocess.run(
        [sys.executable, "generate.py", "check", str(tmp_path / "schema.yaml")], check=False, cwd=ROOT,
        capture_output=True, text=True, timeout=300, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    described = cli.check(str(tmp_path / "schema.yaml"))
    assert described["policies"] == {}
    counted = sum(t.numel() for t in load_file(llm_dirs["policy"] / "model.safetensors").values())
    assert described["llm"]["policy"] == {
        "path": str(llm_dirs["policy"]), "architectures": ["LlamaForCausalLM"], "parameters": counted,
        "dtype": "bfloat16", "device": "auto", "adapter": None, "training": False, "engine": "vllm",
        "served_name": "tiny", "adapters": {"tiny-a": str(llm_dirs["policy_lora"])},
    }
    value_described = described["llm"]["value"]
    assert value_described["parameters"] > counted and value_described["training"] is True
    assert "engine" not in value_described and value_described["dtype"] == "float32"
    printed = dict(line.split(":", 1) for line in done.stdout.splitlines())  # fire: `key: JSON` a line
    assert json.loads(printed["policies"]) == {} and json.loads(printed["llm"]) == described["llm"], done.stdout


def test_the_cli_runs_and_documents_its_commands() -> None:
    help_text = subprocess.run(
        [sys.executable, "generate.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PAGER": "cat", "PATH": "/usr/bin:/bin"},
    )
    assert help_text.returncode == 0, help_text.stderr
    commands = ["copy_server_files", "check", "schema", "export", "import", "serve", "clients"]
    for command in commands:
        assert command in help_text.stdout + help_text.stderr  # fire prints help on stderr
    for command in commands:
        shown = subprocess.run(
            [sys.executable, "generate.py", command, "--help"], cwd=ROOT, capture_output=True, text=True,
            timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"},
        )
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout + shown.stderr
        assert f"generate.py {command} - " in text and "SYNOPSIS" in text, text
    check = subprocess.run(
        [sys.executable, "generate.py", "check", "examples/cartpole/schema.yaml"], cwd=ROOT,
        capture_output=True, text=True, timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"},
    )
    assert check.returncode == 0, check.stderr
    assert "obs_dim" in check.stdout


def test_dataclass_flags_are_typed_and_bools_are_switches() -> None:
    import dataclasses

    from policy_server.cli import parse_dataclass_args

    @dataclasses.dataclass
    class Args:
        steps: int = 10
        rate: float = 0.5
        keep: bool = True

    assert parse_dataclass_args(Args, argv=[]) == Args()
    assert parse_dataclass_args(Args, argv=["--steps", "3", "--no-keep"]) == Args(steps=3, keep=False)
    assert parse_dataclass_args(Args, argv=["--keep", "--rate", "2"]).rate == 2.0


def test_serve_speaks_https_with_the_tls_settings_and_refuses_wrong_ones(model_dir: Path, tmp_path: Path) -> None:
    """`generate.py serve` with POLICY_SERVER_SSL_*: a real uvicorn over TLS with an encrypted key,
    which an httpx client that trusts the certificate (and only such a client) reaches; a key file
    that does not exist stops it before uvicorn starts, with the variable's name."""
    from support import self_signed_certificate, wait_ready

    from policy_server.net import free_port

    cert, key = self_signed_certificate(tmp_path, password="pem-password")
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(multi_policy_schema(model_dir), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS", "SCHEMA_PATH"))}
    env |= {"POLICY_SERVER_BACKEND": "local", "POLICY_SERVER_GATEWAY_METRICS_PORT": "0",
            "POLICY_SERVER_SSL_CERTFILE": str(cert), "POLICY_SERVER_SSL_KEYFILE": str(tmp_path / "missing.pem"),
            "POLICY_SERVER_SSL_KEYFILE_PASSWORD": "pem-password"}
    port = free_port()
    command = [sys.executable, "generate.py", "serve", "--port", str(port), "--schema", str(schema)]
    refused = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "pem-password" not in refused.stderr
    assert f"POLICY_SERVER_SSL_KEYFILE: {tmp_path / 'missing.pem'} does not exist" in refused.stderr, refused.stderr
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(command, cwd=ROOT, env=env | {"POLICY_SERVER_SSL_KEYFILE": str(key)},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url, trusting = f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=cert)
    try:
        wait_ready(server, url, log, timeout=120, verify=trusting)
        assert httpx.get(f"{url}/health/ready", verify=trusting).json()["status"] == "ready"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/health/ready")  # the system's CAs do not know a self-signed certificate
    finally:
        stop_server(server)


def test_export_minari_refuses_in_one_line_what_it_cannot_export(tmp_path: Path) -> None:
    """The export itself is tested end to end in tests/gateway/test_experience_logs.py."""
    from policy_server.errors import NotFound

    with pytest.raises(NotFound, match="no experience log folder"):
        cli.export_minari(str(tmp_path / "missing"), "served/x-v0")
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "p.spaces.json").write_text('{"policy": "p"}')
    (tmp_path / "log" / "q.spaces.json").write_text('{"policy": "q"}')
    with pytest.raises(Conflict, match="name one"):
        cli.export_minari(str(tmp_path / "log"), "served/x-v0")
    done = subprocess.run([sys.executable, "generate.py", "export_minari", str(tmp_path / "missing"), "served/x-v0"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().startswith("policy-server: no experience log folder")

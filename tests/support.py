"""Helpers the tests share that are not fixtures (those live in conftest.py): ``from support import ...``."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import httpx

T = TypeVar("T")
Message = str | Callable[[], str]


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: Message = "condition not met") -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; return that.

    Fails the test (AssertionError) after ``timeout`` seconds with ``message``, or with what
    ``message()`` returns then (a log's tail, the last status). ``predicate`` may itself raise
    to fail at once (a server process that exited, say).
    """
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{_text(message)} (waited {timeout:g} s)")
        time.sleep(interval)
    return result


async def wait_until_async(predicate: Callable[[], T | Awaitable[T]], timeout: float = 30.0,
                           interval: float = 0.001, message: Message = "condition not met") -> T:
    """``wait_until`` inside an event loop: sleeps with ``asyncio.sleep`` so other tasks run;
    ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{_text(message)} (waited {timeout:g} s)")
        await asyncio.sleep(interval)


def _text(message: Message) -> str:
    return message() if callable(message) else message


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 180.0,
               verify: ssl.SSLContext | bool = True) -> None:
    """Poll ``url``/health/ready until it answers 200; fail with the log's end if the server exits
    or is not ready after ``timeout`` seconds. ``verify``: httpx's, for an HTTPS server."""
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health/ready", verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout, 0.5, lambda: "not ready; log: " + log.read_text()[-3000:])


class GlooReplicaEngine:
    """The weight-transfer side of a ``VLLMEngine`` without a vLLM engine: our real worker-side
    ``GlooWeightTransferEngine`` (what runs in vLLM's worker) loading into a model that records
    what it is given. For the publishing tests that need several replicas at once."""

    transfer_backend = "gloo"

    def __init__(self) -> None:
        from types import SimpleNamespace

        import torch
        from vllm.config.weight_transfer import WeightTransferConfig

        from policy_server.llm.vllm_transfer import GlooWeightTransferEngine

        self.version, self.weights = 0, {}
        model = SimpleNamespace(load_weights=lambda pairs: self.weights.update((n, t.clone()) for n, t in pairs))
        parallel = SimpleNamespace(data_parallel_index=0, world_size=1, rank=0)
        config = SimpleNamespace(parallel_config=parallel, model_config=None)
        self.worker = GlooWeightTransferEngine(WeightTransferConfig(backend="gloo"), config, torch.device("cpu"), model)
        self.ranks: list[int] = []  # the rank of each group joined

    def init_weight_transfer(self, init_info: dict) -> None:
        self.worker.init_transfer_engine(self.worker.parse_init_info(init_info))
        self.ranks.append(init_info["rank_offset"])

    def receive_weights(self, update_info: dict, version: int) -> int:
        self.worker.update_weights(update_info)
        self.version = version
        return version

    def shutdown_weight_transfer(self) -> None:
        self.worker.shutdown()

    def set_weights(self, weights: dict, version: int) -> int:
        self.weights.update(weights)
        self.version = version
        return version


def self_signed_certificate(folder: Path, password: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and 127.0.0.1 and its key (encrypted with
    ``password`` when given), written to ``folder`` as PEM; returns (certificate, key). Usable as
    its own CA: a server's and a client's certificate in the TLS tests."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


def live_actors(class_name: str, name: str | None = None) -> dict[str, int]:
    """The live Ray actors of ``class_name`` (and actor ``name``, if given) that have a process:
    actor id -> process id. Read from Ray's GCS table, since ``ray.util.state`` needs the dashboard,
    which the test session's Ray runs without."""
    from ray._private.state import actors

    return {i: a["Pid"] for i, a in actors().items() if a["ActorClassName"] == class_name
            and (name is None or a["Name"] == name) and a["State"] == "ALIVE" and a["Pid"]}


def write_policy_files(folder: Path, ids: list[str], obs_dim: int = 4, actions: int = 3) -> None:
    """One small TorchScript MLP (``obs_dim`` → 8 → ``actions`` logits) saved as ``<id>.pt`` for each
    of ``ids``, each with its own weights (seeded by its position): a ``policies_dir``."""
    import warnings

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    module = torch.nn.Sequential(torch.nn.Linear(obs_dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, actions))
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13; still served
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module.eval())
        params = list(scripted.parameters())
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for policy_id in ids:
                for p in params:
                    p.copy_(torch.randn(p.shape, generator=generator))
                torch.jit.save(scripted, folder / f"{policy_id}.pt")


def load_script(path: Path, name: str) -> ModuleType:
    """The Python file ``path`` (an example's script, not a package module) imported as ``name``;
    registered in ``sys.modules`` first, where dataclasses look their module up while it executes."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

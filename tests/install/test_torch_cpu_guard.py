"""install/torch-cpu-guard: PyPI's CUDA torchvision/torchaudio/torchcodec hidden beside a CPU torch."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import policy_server_torch_cpu_guard as guard


def test_only_non_cpu_companions_beside_a_cpu_torch_are_hidden() -> None:
    versions = {"torchvision": "0.28.0", "torchaudio": "2.13.0+cpu", "torchcodec": None}
    assert guard.unloadable("2.13.0+cpu", versions) == ["torchvision"]
    assert guard.unloadable("2.13.0", versions) == []  # a CUDA torch: the CUDA builds load
    assert guard.unloadable(None, versions) == []
    assert guard.unloadable("2.13.0+cpu", {"torchvision": "0.28.0+cpu"}) == []


def test_a_fresh_interpreter_imports_vllm_and_transformers_image_utils() -> None:
    """What broke before the guard: every process that imports vLLM imports transformers' image
    utilities, which import the CUDA torchvision ("operator torchvision::nms does not exist")."""
    code = (
        "import importlib.util, sys\n"
        "import transformers.image_utils\n"
        "from vllm import SamplingParams\n"
        "print([importlib.util.find_spec(n) is None for n in ('torchvision', 'torchaudio', 'torchcodec')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hidden = guard.unloadable(metadata.version("torch"), {n: guard._version(n) for n in guard.COMPANIONS})
    expected = [name in hidden for name in guard.COMPANIONS]
    assert out.stdout.strip().splitlines()[-1] == str(expected)

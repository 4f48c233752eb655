"""Installs ``policy_server_torch_cpu_guard`` and the ``.pth`` file that runs it at interpreter start."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "policy_server_torch_cpu_guard.pth"


class BuildWithPth(build_py):
    """setuptools installs modules, not ``.pth`` files: copy it beside the module into the wheel's root."""

    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))


setup(
    name="policy-server-torch-cpu-guard",
    version="1.0.0",
    description="Hides PyPI's CUDA torchvision/torchaudio/torchcodec from a CPU build of torch (see the module).",
    py_modules=["policy_server_torch_cpu_guard"],
    cmdclass={"build_py": BuildWithPth},
    python_requires=">=3.10",
)

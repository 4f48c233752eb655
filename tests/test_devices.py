"""resolve_device: the one rule from a configured device name to a torch device."""

from __future__ import annotations

import pytest
import torch

from policy_server.devices import AUTO, resolve_device


def test_auto_is_the_gpu_only_when_one_is_given_and_seen() -> None:
    seen = torch.cuda.is_available()
    assert resolve_device(AUTO) == torch.device("cuda" if seen else "cpu")
    assert resolve_device(AUTO, use_gpu=True).type == ("cuda" if seen else "cpu")
    assert resolve_device(AUTO, use_gpu=False) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "meta"])
@pytest.mark.parametrize("use_gpu", [True, False])
def test_a_named_device_is_taken_as_written(name: str, use_gpu: bool) -> None:
    assert resolve_device(name, use_gpu) == torch.device(name)


def test_a_torch_device_passes_through() -> None:
    device = torch.device("cpu")
    assert resolve_device(device, use_gpu=True) is device


@pytest.mark.parametrize("name", ["gpu", "", "cuda:x", "Auto"])
def test_a_name_torch_cannot_read_is_refused(name: str) -> None:
    with pytest.raises(RuntimeError):
        resolve_device(name)


def test_the_string_form_is_what_torch_policies_and_trainers_take() -> None:
    assert str(resolve_device(AUTO, use_gpu=False)) == "cpu"

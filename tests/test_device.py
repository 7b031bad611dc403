"""The CUDA path of V's and M's training, tested on the CPU: batches reach the device without
waiting for it (pinned, then copied with non_blocking), and the device is the one asked for."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from worldmodels.config import ConfigError, resolve_device
from worldmodels.train import _on


class Copies(TorchDispatchMode):
    """Records every copy between tensors: (source device, target device, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            self.copies.append((args[0].device.type, kwargs.get("device", args[0].device).type, kwargs.get("non_blocking")))
        return func(*args, **kwargs)


def test_batches_move_to_the_device_without_blocking():
    batches = [torch.ones(2, 3), {"z": torch.zeros(4), "a": torch.ones(4, 3)}]
    with Copies() as mode:
        moved = list(_on(torch.device("meta"), iter(batches)))
    assert moved[0].device.type == "meta" and {v.device.type for v in moved[1].values()} == {"meta"}
    assert mode.copies == [("cpu", "meta", True)] * 3


def test_asking_for_cuda_without_it_names_the_field():
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(ConfigError, match=r"^device: 'cuda:1' was asked for but CUDA is not available \(use 'auto' or 'cpu'\)$"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")

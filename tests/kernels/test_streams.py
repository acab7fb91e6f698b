"""braid.kernels.streams' off switch on the CPU: under `serial()` a `beside` block runs its
work on the current stream without touching CUDA, and the switch comes back afterwards, also
when the block raises. The overlap itself is a GPU test (tests/gpu, side_stream)."""

from __future__ import annotations

import pytest
import torch

from braid.kernels import streams


def test_serial_runs_beside_blocks_in_place_and_restores_the_switch(monkeypatch):
    monkeypatch.setattr(streams, "_enabled", True)

    def no_cuda(*args, **kwargs):
        raise AssertionError("a serial beside() block must not touch CUDA streams")

    monkeypatch.setattr(torch.cuda, "Stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    cpu = torch.device("cpu")
    with streams.serial():
        assert not streams.enabled()
        with streams.beside(cpu):
            y = torch.ones(3) * 2
        streams.join(cpu)
        assert y.tolist() == [2.0, 2.0, 2.0]
    assert streams.enabled()
    with pytest.raises(ValueError):
        with streams.serial():
            raise ValueError("inside")
    assert streams.enabled()


def test_the_environment_turns_the_side_stream_off(monkeypatch):
    import importlib

    monkeypatch.setenv("BRAID_SIDE_STREAM", "0")
    try:
        assert importlib.reload(streams).enabled() is False
    finally:
        monkeypatch.delenv("BRAID_SIDE_STREAM")
        importlib.reload(streams)
    assert streams.enabled() is True

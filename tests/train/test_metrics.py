"""MFU arithmetic, the peak-FLOP/s lookup, and metrics.jsonl handling."""

import json
import math

import pytest
import torch

from braid.train.config import LogConfig
from braid.train.metrics import MetricsLogger, Throughput, device_peak_flops, read_metrics


def test_mfu_is_model_flops_over_peak():
    meter = Throughput(flops_per_token=6e6, peak_flops=1e9)
    meter.add(1000)
    rate = meter.rate()
    assert rate["mfu"] == pytest.approx(6e6 * rate["tokens_per_s"] / 1e9, rel=1e-12)
    assert Throughput(6e6, None).rate()["mfu"] is None, "no known peak: MFU is n/a, not a guess"


def test_peak_flops_from_override_or_unknown_on_cpu():
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), override=2e11) == 2e11


def test_metrics_rows_are_json_even_when_not_finite(tmp_path):
    logger = MetricsLogger(tmp_path, LogConfig(), "run", {})
    logger.log({"step": 1, "loss": float("nan"), "mfu": None})
    logger.log({"step": 1, "val_loss": 2.5, "val_ppl": math.exp(2.5)})
    logger.close()
    rows = read_metrics(tmp_path)
    assert rows[0] == {"step": 1, "loss": "nan", "mfu": None}
    assert rows[1]["val_loss"] == 2.5
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match="does not exist"):
        read_metrics(tmp_path / "missing")

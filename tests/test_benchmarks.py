"""What benchmarks/clip_throughput.py computes from the trainers' logs: the per-step rates it
reads, the steady rate it keeps, and MFU."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT


def throughput():
    spec = importlib.util.spec_from_file_location("clip_throughput", ROOT / "benchmarks" / "clip_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_open_clip_rates_are_read_from_its_log_lines():
    log = ("2026-11-26,12:00:01 | INFO | Train Epoch: 0 [   64/7680 (1%)] Data (t): 0.512 Batch (t): 1.102, 58.0760/s, "
           "58.0760/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 4.1589 (4.1589) Loss: 4.1589 (4.1589)\n"
           "2026-11-26,12:00:01 | INFO | Train Epoch: 0 [  128/7680 (2%)] Data (t): 0.001 Batch (t): 0.320, 199.812/s, "
           "199.812/s/gpu LR: 0.000200 Logit Scale: 14.286 Contrastive_loss: 4.1580 (4.1585) Loss: 4.1580 (4.1585)\n")
    assert throughput().open_clip_rates(log) == [58.076, 199.812]


def test_the_steady_rate_is_the_median_after_the_skipped_steps_and_mfu_is_the_flop_share():
    module = throughput()
    assert module.steady([10.0, 500.0, 200.0, 190.0, 210.0], skip=2) == 200.0  # steps 3-5 only
    assert module.steady([1.0, 2.0, 3.0, 4.0], skip=1) == 3.0
    with pytest.raises(SystemExit, match="only 2 steps were logged"):
        module.steady([1.0, 2.0], skip=2)
    assert module.mfu(200.0, 4.5e8, 3e11) == pytest.approx(0.3)  # 9e10 FLOP/s of 3e11

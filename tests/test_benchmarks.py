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


def test_open_clip_log_lines_become_steps_rates_data_shares_and_losses():
    log = ("2026-11-26,12:00:01 | INFO | Train Epoch: 0 [   256/16384 (2%)] Data (t): 0.512 Batch (t): 1.024, 250.000/s, "
           "250.000/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 5.5452 (5.5452) Loss: 5.5452 (5.5452)\n"
           "2026-11-26,12:00:02 | INFO | Train Epoch: 0 [ 2816/16384 (17%)] Data (t): 0.010 Batch (t): 0.080, 3300.12/s, "
           "3300.12/s/gpu LR: 0.000200 Logit Scale: 14.290 Contrastive_loss: 5.4010 (5.4700) Loss: 5.4010 (5.4700)\n"
           "2026-11-26,12:00:09 | INFO | Train Epoch: 2 [ 5376/16384 (33%)] Data (t): 0.020 Batch (t): 0.064, 4100.00/s, "
           "4100.00/s/gpu LR: 0.000300 Logit Scale: 14.300 Contrastive_loss: 4.9000 (5.0100) Loss: 4.9000 (5.0100)\n")
    records = throughput().open_clip_log(log, batch_size=256)
    # step: 64 steps an epoch before it, plus the batches of its own; the rate is the batch over
    # the interval's mean batch time (not the last step's rate the line also prints)
    assert [r["step"] for r in records] == [1, 11, 2 * 64 + 21]
    assert [r["samples_per_s"] for r in records] == pytest.approx([250.0, 3200.0, 4000.0])
    assert [r["data_share"] for r in records] == pytest.approx([0.5, 0.125, 0.3125])
    assert [r["loss"] for r in records] == [5.5452, 5.4010, 4.9000]


def test_the_steady_rate_is_the_median_of_the_intervals_ending_after_the_skipped_steps():
    module = throughput()
    records = [{"step": step, "samples_per_s": rate} for step, rate in
               [(10, 20.0), (20, 500.0), (30, 200.0), (40, 190.0), (50, 210.0)]]
    assert module.steady(records, skip=20) == 200.0  # the intervals ending at 30, 40, 50
    assert module.steady(records, skip=19) == 205.0  # 20 ends after 19: four intervals
    with pytest.raises(SystemExit, match="no log line after step 50"):
        module.steady(records, skip=50)

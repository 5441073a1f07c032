"""What benchmarks/clip_throughput.py computes from the trainers' logs: the per-step rates it
reads, the steady rate it keeps, MFU, and which trainers it runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import ROOT


def throughput():
    spec = importlib.util.spec_from_file_location("clip_throughput", ROOT / "benchmarks" / "clip_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_open_clip_log_lines_become_steps_rates_data_shares_and_losses():
    log = ("2026-11-26,12:00:01 | INFO | at 100.000000 Train Epoch: 0 [   256/16384 (2%)] Data (t): 0.512 Batch (t): "
           "1.024, 250.000/s, 250.000/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 5.5452 (5.5452) "
           "Loss: 5.5452 (5.5452)\n"
           "2026-11-26,12:00:02 | INFO | at 100.800000 Train Epoch: 0 [ 2816/16384 (17%)] Data (t): 0.010 Batch (t): "
           "0.081, 3300.12/s, 3300.12/s/gpu LR: 0.000200 Logit Scale: 14.290 Contrastive_loss: 5.4010 (5.4700) "
           "Loss: 5.4010 (5.4700)\n"
           "2026-11-26,12:00:09 | INFO | at 109.632000 Train Epoch: 2 [ 5376/16384 (33%)] Data (t): 0.020 Batch (t): "
           "0.064, 4100.00/s, 4100.00/s/gpu LR: 0.000300 Logit Scale: 14.300 Contrastive_loss: 4.9000 (5.0100) "
           "Loss: 4.9000 (5.0100)\n")
    records = throughput().open_clip_log(log, batch_size=256)
    # step: 64 steps an epoch before it, plus the batches of its own; the rate is the samples since
    # the line before over the time between their stamps (10 x 256 in 0.8 s, 138 x 256 in 8.832 s),
    # the first line's from its mean batch time, not from the last step's rate the line also prints
    assert [r["step"] for r in records] == [1, 11, 2 * 64 + 21]
    assert [r["samples_per_s"] for r in records] == pytest.approx([250.0, 3200.0, 4000.0])
    assert [r["data_share"] for r in records] == pytest.approx([0.5, 0.010 / 0.081, 0.3125])
    assert [r["loss"] for r in records] == [5.5452, 5.4010, 4.9000]


def test_open_clip_train_takes_the_same_pixels_as_mmkit(tmp_path):
    import argparse

    import open_clip
    from open_clip_train.params import parse_args

    from mmkit import build

    bench = throughput()
    args = argparse.Namespace(**bench.PRESETS["cuda"], device="cuda")
    command = bench.open_clip_command(tmp_path / "data.csv", args, tmp_path, compiled=False)
    settings = parse_args(command[3:])  # after the interpreter, the launcher and the model config
    _, train_transform, _ = open_clip.create_model_and_transforms("ViT-B-32", aug_cfg=settings.aug_cfg)
    image = build("datasets", "synthetic_shapes", num_samples=1, image_size=224)[0]["image"]
    mmkit = build("image_encoders", "open_clip", model_name="ViT-B-32").inputs([image])
    assert torch.allclose(train_transform(image).unsqueeze(0), mmkit, atol=1e-5)  # the whole image, no random crop


def test_the_steady_rate_is_the_median_of_the_intervals_after_the_skipped_steps_and_before_the_profiled_ones():
    module = throughput()
    records = [{"step": step, "samples_per_s": rate, "data_share": share} for step, rate, share in
               [(10, 20.0, 0.9), (20, 500.0, 0.1), (30, 200.0, 0.2), (40, 190.0, 0.4), (50, 210.0, 0.3), (52, 5.0, 0.0)]]
    assert module.steady(records, skip=20, until=53) == 195.0  # the intervals ending at 30, 40, 50 and 52
    assert module.steady(records, skip=20, until=52) == 200.0  # 51-52 holds step 52, profiled: 30, 40, 50
    assert module.steady(records, skip=19, until=51) == 205.0  # 20 ends after 19; 52 holds step 51, profiled
    assert module.steady(records, skip=20, until=50) == 195.0  # 41-50 holds step 50: 30 and 40 are left
    assert module.steady(records, skip=20, until=50, key="data_share") == pytest.approx(0.3)
    with pytest.raises(SystemExit, match="no log line after step 52 and before 60"):
        module.steady(records, skip=52, until=60)


def test_mmkit_profiles_the_last_profile_steps_and_with_none_no_step():
    import argparse

    module = throughput()
    assert module.profiled_steps(argparse.Namespace(steps=192, profile=6)) == (187, 192)  # 187, ..., 192: six
    assert module.profiled_steps(argparse.Namespace(steps=80, profile=0))[0] == 81  # past step 80, the last


def test_only_keeps_the_named_trainers_in_the_runs_order_and_refuses_others():
    module = throughput()
    assert list(module.chosen_trainers(True, None)) == [
        "open_clip_train", "open_clip_train --torchcompile", "mmkit train.compile", "mmkit"]
    assert list(module.chosen_trainers(False, None)) == ["open_clip_train", "mmkit"]
    kept = module.chosen_trainers(True, ["mmkit train.compile", "open_clip_train"])
    assert list(kept) == ["open_clip_train", "mmkit train.compile"]
    assert kept["mmkit train.compile"] == (module.run_mmkit, True)
    with pytest.raises(SystemExit, match="--only mmkit train.compile: not among this run's trainers"):
        module.chosen_trainers(False, ["mmkit train.compile"])

"""MFU's parts: a training step's FLOPs counted on fixed layers, and a count that leaves no trace."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mmkit.engine.flops import batch_rows, count_flops, matmul_rate, mfu
from mmkit.tasks.base import Task


class TwoLayers(Task):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 5, bias=False), nn.Linear(5, 2, bias=False)

    def training_step(self, batch):
        return {"loss/square": (self.second(self.first(batch["x"])) ** 2).sum(), "rows": torch.tensor(4.0)}


def test_a_step_counts_the_forward_and_the_backward_products():
    # forward: 2*4*3*5 + 2*4*5*2 = 200; backward: second's weight 80 and its input 80, first's weight 120
    # (the batch needs no gradient) = 280
    flops = count_flops(TwoLayers(), {"x": torch.randn(4, 3)}, Accelerator(cpu=True))
    assert flops == 480


class Attention(Task):
    def __init__(self):
        super().__init__()
        self.project = nn.Linear(8, 8, bias=False)

    def training_step(self, batch):
        q = self.project(batch["x"]).view(2, 1, 5, 8)
        return {"loss/sum": nn.functional.scaled_dot_product_attention(q, q, q).sum()}


def test_attention_is_counted_as_its_products_on_the_cpu_too():
    # projection 2*10*8*8 = 1280 forward and 1280 for its weight's gradient (the batch needs none);
    # attention QK^T and AV 2*2*5*5*8 = 800 each forward, their two gradients each backward: 1600 + 3200
    flops = count_flops(Attention(), {"x": torch.randn(2, 5, 8)}, Accelerator(cpu=True))
    assert flops == 1280 + 1280 + 1600 + 3200


class Noisy(Task):
    def __init__(self):
        super().__init__()
        self.linear, self.norm, self.drop = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)
        self.frozen = nn.Linear(4, 4)
        self.frozen.eval()

    def training_step(self, batch):
        noise = torch.rand(())  # a task's own draw, in either mode (negatives sampled, say)
        return {"loss/mean": self.frozen(self.drop(self.norm(self.linear(batch["x"])))).mean() + 0 * noise}


def test_counting_leaves_the_rng_gradients_modes_and_buffers_as_they_were():
    task = Noisy().train()
    task.frozen.eval()
    task.norm.eval()  # counted in train mode, which updates the statistics: they must be put back
    task.linear.weight.grad = torch.full((4, 4), 7.0)
    batch = {"x": torch.randn(8, 4)}
    rng, norm = torch.get_rng_state(), task.norm.running_mean.clone()
    count_flops(task, batch, Accelerator(cpu=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(task.linear.weight.grad, torch.full((4, 4), 7.0)) and task.norm.weight.grad is None
    assert torch.equal(task.norm.running_mean, norm)
    assert task.training and task.drop.training and not task.norm.training and not task.frozen.training


class FrozenTransformer(Task):
    def __init__(self, frozen: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(8, 1)
        if frozen:  # as freeze = true leaves a part: no gradients, eval mode
            self.encoder.requires_grad_(False).eval()

    def training_step(self, batch):
        padding = torch.zeros(batch["x"].shape[:2], dtype=torch.bool)
        padding[:, -1] = True
        return {"loss/mean": self.head(self.encoder(batch["x"], src_key_padding_mask=padding)).mean()}


def test_a_frozen_transformer_is_counted_though_eval_mode_would_take_the_fused_path():
    batch = {"x": torch.randn(2, 5, 8)}
    frozen = FrozenTransformer(frozen=True)
    counted = count_flops(frozen, batch, Accelerator(cpu=True))
    forward_only = FrozenTransformer(frozen=False).requires_grad_(False)  # the same layers in train mode
    forward_only.head.requires_grad_(True)
    assert counted == count_flops(forward_only, batch, Accelerator(cpu=True)) > 2 * 2 * 5 * 8 * 16 * 2
    assert not frozen.encoder.training  # put back


def test_a_batch_counts_the_rows_of_its_first_tensor():
    assert batch_rows({"id": ["a", "b", "c"], "text": {"input_ids": torch.zeros(3, 7)}, "image": torch.zeros(3, 1)}) == 3
    with pytest.raises(ValueError, match="no tensor to count its samples by"):
        batch_rows({"id": ["a"]})


def test_mfu_is_the_achieved_flops_over_all_devices_peak():
    assert mfu(100.0, 2e9, 1e12) == pytest.approx(0.2)
    assert mfu(100.0, 2e9, 1e12, devices=2) == pytest.approx(0.1)


def test_the_matmul_rate_is_measured_without_drawing_from_the_run_rng():
    matmul_rate.cache_clear()  # an earlier run in this process may have measured it
    rng = torch.get_rng_state()
    rate = matmul_rate("cpu", "fp32")
    assert torch.equal(torch.get_rng_state(), rng)
    assert 1e9 < rate < 1e14  # a CPU's fp32 product: between a GFLOP/s and a hundred TFLOP/s
    assert matmul_rate("cpu", "fp32") == rate  # measured once per process

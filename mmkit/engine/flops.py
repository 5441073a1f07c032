"""Model FLOPs utilisation: a training step's FLOPs, counted once, over the device's matmul rate."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import torch

from mmkit.specs import precision_dtype


def count_flops(task: torch.nn.Module, batch: dict[str, Any], accelerator: Any,
                model: torch.nn.Module | None = None) -> int:
    """FLOPs of one forward + backward of ``task`` on the prepared ``batch`` (counted by
    torch.utils.flop_counter), leaving nothing behind: the RNG streams, the gradients, every
    module's train/eval mode and its buffers (BatchNorm statistics) are put back, so a run that
    counts trains exactly as one that does not. Every module counts in train mode: in eval mode
    a frozen fp32 transformer layer takes PyTorch's fused fast path, whose FLOPs the counter
    does not see. Compiled encoders run eagerly here (the counter sees each op), and attention as
    its matrix products (``counted_attention``). ``model`` is
    the distributed wrapper, kept from syncing gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in task.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    modes = [(module, module.training) for module in task.modules()]
    buffers = [(buffer, buffer.clone()) for buffer in task.buffers()]
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    no_sync = accelerator.no_sync(model) if model is not None else contextlib.nullcontext()
    try:
        for p in params:
            p.grad = None  # backward would add into a gradient held here
        task.train()
        with torch.random.fork_rng(devices=cuda), no_sync, torch.compiler.set_stance("force_eager"), \
                counted_attention(accelerator.device), FlopCounterMode(display=False) as counter:
            with accelerator.autocast():
                terms = [v for k, v in task.training_step(dict(batch)).items() if k.startswith("loss/")]
            loss = sum(terms)
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return counter.get_total_flops()


def counted_attention(device: torch.device | str = "cpu") -> Any:
    """Within the block attention on the CPU runs as the matrix products the FLOP counter sees:
    it has no formula for the CPU's fused kernel, which it counted as 0. On a GPU it has one for
    each fused kernel, which keeps long sequences from the memory the products would take."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def batch_rows(batch: dict[str, Any]) -> int:
    """How many samples a batch holds: the first dimension of its first tensor (inside a
    modality's dict of tensors too)."""
    for value in batch.values():
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    raise ValueError(f"the batch holds no tensor to count its samples by (keys: {', '.join(batch)})")


@functools.cache
def matmul_rate(device: str, precision: str = "fp32") -> float:
    """The FLOP/s ``device`` reaches on a large matrix product in the run's compute type (the
    best of a few, after a warm-up): MFU's denominator. Measured, because a CPU has no
    datasheet peak and a GPU's is a ceiling no model reaches; random operands from a
    generator of their own, so the run's RNG is not drawn from."""
    cuda = device.startswith("cuda")
    size, repeats = (8192, 5) if cuda else (1024, 5)
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device, dtype=precision_dtype(precision)) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is the warm-up
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu(samples_per_s: float, flops_per_sample: float, peak_per_device: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: the FLOP/s training does over what its devices can do."""
    return samples_per_s * flops_per_sample / (peak_per_device * devices)

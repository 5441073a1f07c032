"""Held-out evaluation, shared by the processes: each predicts its share, the shares are joined."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from mmkit.data.loader import to_device
from mmkit.engine.feed import OnError, Problems, take_problems
from mmkit.tasks.base import Task


class Evaluation:
    """A held-out set's loader (this process's share), the encoders' steps that finish its
    batches on the device, and the bad samples met in it."""

    def __init__(self, loader: DataLoader, on_error: OnError, log: Any, problems: Problems | None = None,
                 on_device: Mapping[str, Callable[[Any], Any]] | None = None):
        self.loader, self.on_error, self.log = loader, on_error, log
        self.on_device = dict(on_device or {})
        self.problems = Problems() if problems is None else problems

    def outputs(self, task: Task, accelerator: Any) -> dict[str, Any]:
        """The task's per-item outputs over the whole held-out set, in order, on every process."""
        task.eval()
        # eagerly, also inside a compiled training run (train.compile): held-out numbers as an
        # eager run has them, and no CUDA-graph replay overwrites an earlier batch's outputs
        with torch.no_grad(), accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            mine = task.predict(self._batches(accelerator.device))
        task.train()
        return join(all_processes(mine, accelerator))

    def metrics(self, task: Task, accelerator: Any, outputs: dict[str, Any] | None = None,
                calibrate: bool = False) -> dict[str, float]:
        """Held-out metrics (from ``outputs`` when given), prefixed ``val/``, on the main process;
        with ``calibrate`` (a training run's validation split) the task first sets what it
        chooses there, on every process alike."""
        outputs = self.outputs(task, accelerator) if outputs is None else outputs
        if calibrate:
            task.calibrate(outputs)
        if not accelerator.is_main_process:
            return {}
        return {f"val/{key}": value for key, value in task.evaluate(outputs).items()}

    def all_problems(self, accelerator: Any) -> Problems:
        """The bad held-out samples every process met."""
        return every_process_problems(self.problems, accelerator)

    def _batches(self, device: torch.device) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            batch = take_problems(batch, self.problems, self.on_error, self.log)
            if batch:  # a batch of only bad samples has nothing left
                yield to_device(batch, device, self.on_device)


def all_processes(value: Any, accelerator: Any) -> list[Any]:
    """``value`` from every process, in process order (just this one's when alone)."""
    if accelerator.num_processes == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, value)
    return gathered


def every_process_problems(problems: Problems, accelerator: Any) -> Problems:
    """The bad samples every process met (each met ``problems``), as one count."""
    return Problems.joined(all_processes(list(problems.seen.values()), accelerator))


def join(shares: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-item outputs of consecutive shares as one: tensors concatenated, lists chained."""
    joined = {}
    for key in shares[0]:
        values = [share[key] for share in shares]
        joined[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]
    return joined

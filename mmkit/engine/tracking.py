"""Metric logging: one JSON line per log step or evaluation, mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mmkit.files import write_text_atomic


class Tracker:
    """Appends to ``metrics.jsonl`` and TensorBoard events; silent on non-main processes.

    On resume, records after the checkpoint's step are dropped from both, so the logs read
    as one uninterrupted run.
    """

    def __init__(self, folder: Path, enabled: bool, resume_step: int | None = None):
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in self.records() if r["step"] <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides events at purge_step and later; the checkpoint's own step stays.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values, "time": time.time()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        """Push TensorBoard events to disk, so a killed run keeps what its checkpoint covers."""
        if self.writer is not None:
            self.writer.flush()

    def records(self) -> list[dict[str, Any]]:
        """Every logged record; a line cut short by a killed process is left out."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

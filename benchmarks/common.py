"""What the benchmark scripts share: a data folder, the machine they ran on, their JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from datetime import date
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def data_folder(chosen: str | None, prefix: str) -> Iterator[Path]:
    """``chosen`` (made, and kept for the next run), or a temporary folder removed after."""
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        yield Path(chosen)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


def machine() -> dict[str, Any]:
    """When and where the numbers were taken."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {"date": date.today().isoformat(), "machine": platform.platform(), "python": platform.python_version(),
            "cpu_cores": cores, "torch": torch.__version__}


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages: other processes slow every measurement alike."""
    return [round(load, 2) for load in os.getloadavg()]


def write_results(results: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"numbers written to {path}")

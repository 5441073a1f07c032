"""train.profile: a window of training steps under torch.profiler, its tables and trace
written to the run folder. Profiling steps after the compile and the loader's start shows
where a steady step's time goes, which a profile of the whole run buries under them."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from mmkit.files import write_text_atomic

WAITS = {"waiting for batches": ("DataLoader",),  # enumerate(DataLoader)#...__next__
         "waiting for the device": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")}


@dataclass
class Profiled:
    """What the profiled steps took (summary.json's ``profile``): their wall seconds, the
    seconds the device ran kernels and copies in them (None on a CPU), and the host's waits."""

    steps: list[int]
    seconds: float
    device_busy_seconds: float | None
    waiting_for_batches_seconds: float
    folder: str = "profile"

    @property
    def device_busy(self) -> float | None:
        """Share of the window the device was busy: near 1 the device is the limit; well below
        it the host (launches, Python, the loader) kept it waiting."""
        return None if self.device_busy_seconds is None else self.device_busy_seconds / max(self.seconds, 1e-9)

    def summary(self) -> dict[str, Any]:
        """summary.json's ``profile``: the fields and the device's busy share."""
        return asdict(self) | {"device_busy": None if self.device_busy is None else round(self.device_busy, 4)}


class StepProfiler:
    """Profiles training steps ``first`` to ``last`` (a resumed run that starts inside the window,
    from its first step) and writes ``profile/ops.txt`` (the costliest ops) and
    ``profile/trace.json`` (open in https://ui.perfetto.dev) after the last; each step is
    marked ``ProfilerStep#<step>``. ``window`` None profiles nothing."""

    def __init__(self, window: list[int] | None, folder: Path, device: torch.device, rows: int = 25):
        self.window, self.folder, self.device, self.rows = window, folder, device, rows
        self.profiler: profile | None = None
        self.first, self.started = 0, 0.0
        self.result: Profiled | None = None

    def __enter__(self) -> StepProfiler:
        if self.window is not None and self.device.type == "cuda":
            with self._profile():  # CUPTI set up before any CUDA graph is recorded (pytorch#75504)
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        """A run stopped inside the window writes no profile (it would be of part of it)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def step(self, step: int) -> Any:
        """A context for training step ``step``: starts the profiler at the window's first."""
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            return contextlib.nullcontext()
        if self.profiler is None:
            self.profiler = self._profile()
            self.profiler.start()
            self.first, self.started = step, time.perf_counter()
        return record_function(f"ProfilerStep#{step}")

    def _profile(self) -> profile:
        if not torch.cuda.is_available():
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # else kineto prints the missing GPU as an error
        cuda = [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
        return profile(activities=[ProfilerActivity.CPU, *cuda], acc_events=True)  # one window: nothing to clear

    def finish(self, step: int) -> bool:
        """After step ``step``: at the window's last, stop and write the files (whether it did)."""
        if self.profiler is None or step != self.window[1]:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's kernels are in the profile, and in its seconds
        seconds = time.perf_counter() - self.started
        self.profiler.stop()
        events = self.profiler.key_averages()
        self.result = Profiled([self.first, step], seconds, busy_seconds(events) if self.device.type == "cuda" else None,
                               waits(events)["waiting for batches"])
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / "ops.txt", ops_text(self.result, events, self.rows))
        self.profiler.export_chrome_trace(str(self.folder / "trace.json"))
        self.profiler = None
        return True


def busy_seconds(events: Any) -> float:
    """Seconds of the device's kernels and copies: their own rows alone (an op's row repeats
    the kernels it launched, so summing every row counts each twice)."""
    return sum(event.self_device_time_total for event in events
               if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / 1e6


def waits(events: Any) -> dict[str, float]:
    """Seconds the host spent in each kind of wait (the ops' total time, nested calls included)."""
    found = dict.fromkeys(WAITS, 0.0)
    for event in events:
        for kind, names in WAITS.items():
            if any(name in event.key for name in names):
                found[kind] += event.cpu_time_total / 1e6
    return found


def ops_text(profiled: Profiled, events: Any, rows: int) -> str:
    """The window's totals, then its ops by time on the device (on a GPU) and on the host."""
    first, last = profiled.steps
    lines = [f"steps {first}-{last} ({last - first + 1}) in {profiled.seconds:.3f} s under torch.profiler"]
    if profiled.device_busy_seconds is not None:
        lines.append(f"device busy (kernels and copies): {profiled.device_busy_seconds:.3f} s = "
                     f"{profiled.device_busy:.0%} of the window")
    lines += [f"host {kind}: {seconds:.3f} s" for kind, seconds in waits(events).items()]
    if profiled.device_busy_seconds is not None:
        lines += ["", "by time on the device:", events.table(sort_by="self_device_time_total", row_limit=rows)]
    lines += ["", "by time on the host:", events.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(lines) + "\n"

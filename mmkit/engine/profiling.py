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
         # a step's reads of the device (.item(), a copy to the host); the drain at the window's
         # end is a device synchronisation and is left out
         "waiting for the device": ("cudaStreamSynchronize", "cudaEventSynchronize")}


@dataclass
class Profiled:
    """What the profiled steps took (summary.json's ``profile``): their wall seconds, the
    seconds the device ran kernels and copies in them (None on a CPU), and the host's wait for
    batches; the tables and timeline are in ``folder`` of the run folder."""

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

    @classmethod
    def from_summary(cls, summary: dict[str, Any] | None) -> Profiled | None:
        """The window a checkpoint's trainer.json holds (``summary``'s fields), or None."""
        return None if summary is None else cls(**{k: v for k, v in summary.items() if k != "device_busy"})


class StepProfiler:
    """Profiles training steps ``first`` to ``last`` (a resumed run that starts inside the window,
    from its first step) and writes ``profile/ops.txt`` (the costliest ops) and
    ``profile/trace.json`` (open in https://ui.perfetto.dev) after the last; each step is
    marked ``ProfilerStep#<step>``. ``window`` None profiles nothing. On a GPU the window starts
    and ends with the device idle, so its seconds hold its own device work and no other's."""

    def __init__(self, window: list[int] | None, folder: Path, device: torch.device, rows: int = 25):
        self.window, self.folder, self.device, self.rows = window, folder, device, rows
        self.profiler: profile | None = None
        self.first, self.started = 0, 0.0
        self.result: Profiled | None = None

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        """A run stopped inside the window writes no profile (it would be of part of it)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def step(self, step: int) -> contextlib.AbstractContextManager[Any]:
        """A context for training step ``step``: starts the profiler at the window's first."""
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            return contextlib.nullcontext()
        if self.profiler is None:
            self._drain()  # earlier steps' work still queued on the device is not the window's
            self.profiler = self._profile()
            self.profiler.start()
            self.first, self.started = step, time.perf_counter()
        return record_function(f"ProfilerStep#{step}")

    def finish(self, step: int) -> None:
        """After step ``step``: at the window's last, stop and write the files."""
        if self.profiler is None or step != self.window[1]:
            return
        self._drain()  # the window's device work is in the profile, and in its seconds
        seconds = time.perf_counter() - self.started
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        cuda = self.device.type == "cuda"
        events = profiler.key_averages()
        waited = waits(events)
        self.result = Profiled([self.first, step], seconds, busy_seconds(profiler.events()) if cuda else None,
                               waited["waiting for batches"])
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / "ops.txt", ops_text(self.result, events, waited, self.rows))
        partial = self.folder / "trace.json.partial"
        profiler.export_chrome_trace(str(partial))
        os.replace(partial, self.folder / "trace.json")

    def _drain(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _profile(self) -> profile:
        if not torch.cuda.is_available():
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # else kineto prints the missing GPU as an error
        cuda = [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
        return profile(activities=[ProfilerActivity.CPU, *cuda], acc_events=True)  # acc_events: no per-cycle warning


def busy_seconds(events: Any) -> float:
    """Seconds the device ran kernels or copies: the union of their time spans, so work on
    several streams at once (a copy beside a kernel, a collective beside compute) counts once."""
    return union_seconds([(event.time_range.start, event.time_range.end) for event in events
                          if event.device_type == DeviceType.CUDA and not event.is_user_annotation]) / 1e6


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def waits(events: Any) -> dict[str, float]:
    """Seconds the host spent in each kind of wait (the ops' total time, nested calls included)."""
    found = dict.fromkeys(WAITS, 0.0)
    for event in events:
        for kind, names in WAITS.items():
            if any(name in event.key for name in names):
                found[kind] += event.cpu_time_total / 1e6
    return found


def ops_text(profiled: Profiled, events: Any, waited: dict[str, float], rows: int) -> str:
    """The window's totals and the host's ``waits``, then its ops by time on the device (on a
    GPU) and on the host."""
    first, last = profiled.steps
    lines = [f"steps {first}-{last} ({last - first + 1}) in {profiled.seconds:.3f} s under torch.profiler"]
    if profiled.device_busy_seconds is not None:
        lines.append(f"device busy (kernels and copies): {profiled.device_busy_seconds:.3f} s = "
                     f"{profiled.device_busy:.0%} of the window")
    lines += [f"host {kind}: {seconds:.3f} s" for kind, seconds in waited.items()]
    if profiled.device_busy_seconds is not None:
        lines += ["", "by time on the device:", events.table(sort_by="self_device_time_total", row_limit=rows)]
    lines += ["", "by time on the host:", events.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(lines) + "\n"

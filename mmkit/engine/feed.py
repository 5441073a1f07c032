"""What the training loop reads: batches from their place in the data, and the bad samples met."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

from torch.utils.data import DataLoader

from mmkit.data.loader import FATAL, POSITION, PROBLEMS, EpochBatches, Streamed
from mmkit.errors import MMKitError
from mmkit.samples import SampleError

OnError = Literal["raise", "skip"]


class Problems:
    """The bad samples met so far, each listed once with how many times it was met (a
    skipped training sample comes round again every epoch)."""

    def __init__(self, records: Iterable[dict[str, Any]] = ()):
        self.seen: dict[tuple, dict[str, Any]] = {}
        for record in records:
            self.seen[_key(record)] = dict(record)

    def add(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Count ``records``; return those met for the first time."""
        new = []
        for record in records:
            known = self.seen.get(_key(record))
            if known is None:
                self.seen[_key(record)] = known = {**record, "times": 0}
                new.append(record)
            known["times"] += record.get("times", 1)
        return new

    @classmethod
    def joined(cls, shares: Iterable[Iterable[dict[str, Any]]]) -> Problems:
        """The problems several processes met, as one count."""
        joined = cls()
        for records in shares:
            joined.add(records)
        return joined

    def summary(self) -> dict[str, Any]:
        """For summary.json: how many bad samples, how many times they were met, and each one."""
        listed = sorted(self.seen.values(), key=lambda r: (r["source"], str(r["row"]), r["path"] or ""))
        return {"samples": len(listed), "times": sum(r["times"] for r in listed), "list": listed}


def _key(record: dict[str, Any]) -> tuple:
    return record["source"], str(record["row"]), record["path"], record["kind"]


def take_problems(batch: dict[str, Any], problems: Problems, on_error: OnError, log: Any) -> dict[str, Any]:
    """``batch`` without its bookkeeping; its bad samples counted (and each new one logged),
    or, under on_error = "raise", the first of them raised as one line."""
    records = batch.pop(PROBLEMS, [])
    batch.pop(POSITION, None)
    if records and on_error == "raise":
        raise MMKitError(f"{SampleError.from_record(records[0]).line()} "
                         '(set data.on_error = "skip" to drop bad samples and list them in summary.json)')
    for record in problems.add(records):
        log(f"skipped {SampleError.from_record(record).line()}")
    return batch


class TrainFeed:
    """Training micro-batches without end, from a place in the data: a map-style dataset's
    place follows from the micro-batches read; a stream's is each worker share's (epoch,
    records read), kept in checkpoints. ``on_device``: the encoders' steps that finish a batch
    on the device (mmkit.data.loader.to_device)."""

    def __init__(self, loader: DataLoader, source: EpochBatches | Streamed, on_error: OnError, log: Any,
                 on_device: Mapping[str, Callable[[Any], Any]] | None = None):
        self.loader, self.source, self.on_error, self.log = loader, source, on_error, log
        self.on_device = dict(on_device or {})
        self.problems = Problems()
        self.positions: dict[int, tuple[int, int]] = {}
        self.batches: Iterator[dict[str, Any]] | None = None
        self.start_at = 0

    def start(self, micro_batches: int, state: dict[str, Any] | None = None) -> None:
        """Begin after ``micro_batches`` micro-batches, with a checkpoint's ``state``; nothing
        is read (and no worker started) before the first batch is asked for."""
        state = state or {}
        self.problems = Problems(state.get("problems", ()))
        self.positions = {int(k): tuple(v) for k, v in state.get("positions", {}).items()}
        self.start_at = micro_batches
        self.batches = None

    def __next__(self) -> dict[str, Any]:
        if self.batches is None:
            if isinstance(self.source, Streamed):
                self.source.resume(self.positions, self.start_at)
                self.batches = iter(self.loader)
            else:
                self.batches = micro_batches(self.loader, self.source, self.start_at)
        batch = next(self.batches)
        if FATAL in batch:
            raise MMKitError(batch[FATAL])
        if POSITION in batch:
            share, epoch, read = batch[POSITION]
            self.positions[share] = (epoch, read)
        return take_problems(batch, self.problems, self.on_error, self.log)

    def close(self) -> None:
        """Shut the loader's workers down now: the final evaluation runs without them, and a run
        that stops on an error must not wait on them. Persistent workers live in the loader's
        iterator (torch has no public call to end them), not in the batches drawn from it."""
        self.batches = None
        iterator, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this process's data: stream positions and bad samples."""
        return {"positions": {str(k): list(v) for k, v in self.positions.items()},
                "problems": [dict(record) for record in self.problems.seen.values()]}


def micro_batches(loader: DataLoader, sampler: EpochBatches, start: int) -> Iterator[dict[str, Any]]:
    """Batches across epochs without end, beginning after ``start`` micro-batches."""
    epoch, skip = divmod(start, len(sampler))
    while True:
        sampler.set_epoch(epoch, skip)
        yield from loader
        epoch, skip = epoch + 1, 0

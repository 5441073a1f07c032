"""Held-out outputs joined across processes in order, the bad samples left out of the report's
view, and bad samples counted once each however often they are met."""

from __future__ import annotations

import torch

from mmkit.engine.evaluation import join
from mmkit.engine.feed import Problems
from mmkit.engine.run import Readable


def test_shares_join_in_process_order():
    first = {"image": torch.tensor([[0.0], [1.0]]), "captions": ["a", "b"]}
    second = {"image": torch.tensor([[2.0]]), "captions": ["c"]}
    joined = join([first, second])
    assert joined["image"].flatten().tolist() == [0.0, 1.0, 2.0] and joined["captions"] == ["a", "b", "c"]


def test_the_report_sees_item_i_as_the_ith_sample_that_was_read():
    dataset = [f"sample {i}" for i in range(6)]
    problems = Problems()
    problems.add([{"kind": "missing file", "source": "m.csv", "row": 3, "path": "b.jpg", "message": "", "index": 1},
                  {"kind": "empty text", "source": "m.csv", "row": 6, "path": None, "message": "", "index": 4}])
    readable = Readable(dataset, problems)
    assert len(readable) == 4 and [readable[i] for i in range(4)] == ["sample 0", "sample 2", "sample 3", "sample 5"]


def test_a_bad_sample_is_listed_once_with_how_often_it_was_met():
    record = {"kind": "truncated image", "source": "m.csv", "row": 7, "path": "a.jpg", "message": "cut"}
    other = {**record, "row": 8, "path": "b.jpg"}
    problems = Problems()
    assert problems.add([record, record]) == [record]  # new the first time only
    assert problems.add([record, other]) == [other]
    summary = problems.summary()
    assert (summary["samples"], summary["times"]) == (2, 4)
    assert [(r["row"], r["times"]) for r in summary["list"]] == [(7, 3), (8, 1)]
    restored = Problems(summary["list"])  # as a checkpoint gives them back
    restored.add([other])
    assert [(r["row"], r["times"]) for r in restored.summary()["list"]] == [(7, 3), (8, 2)]
    joined = Problems.joined([summary["list"], [record]])  # two processes' counts
    assert [(r["row"], r["times"]) for r in joined.summary()["list"]] == [(7, 4), (8, 1)]

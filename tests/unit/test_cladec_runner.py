"""ClaDecRunner and ClaDecJob with a stand-in view: grouping, the keyed merge, faults, the thread."""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from handlers.runtime.cladec import ClaDecRunner, ClaDecView, ClaDecOptions, DecoderEntry
from handlers.runtime.helper import HelperThread


def _helper(overlap: bool) -> HelperThread | None:
    """The worker's helper thread (named as the runner's threads are matched below), or none."""
    return HelperThread("cladec") if overlap else None


class StandInView(ClaDecView):
    """Sessions replaced by images that name their row and file; records every call."""

    def __init__(self) -> None:
        entries = [DecoderEntry("layer2", 0.0, "dec2a", "ref2"), DecoderEntry("layer2", 0.1, "dec2b", "ref2"),
                   DecoderEntry("avgpool", 0.0, "dec9", "ref9")]
        super().__init__(entries, {}, {})
        self.calls: list[tuple[str, tuple[int, ...], tuple[str, ...] | None, str]] = []

    def references(self, x: np.ndarray, rows: Sequence[int], entries: Sequence[DecoderEntry],
                   image_format: str = "png"):
        self.calls.append(("references", tuple(rows), tuple(e.decoder_file for e in entries),
                           threading.current_thread().name))
        files = dict.fromkeys(e.refae_file for e in entries)
        return {r: {f: f"{f}@{int(x[r])}".encode() for f in files} for r in reversed(list(rows))}

    def reconstructions(self, activations: dict[str, np.ndarray], rows: Sequence[int],
                        entries: Sequence[DecoderEntry], image_format: str = "png"):
        self.calls.append(("reconstructions", tuple(rows), tuple(e.decoder_file for e in entries),
                           threading.current_thread().name))
        return {r: {e.decoder_file: f"{e.decoder_file}@{int(activations['x'][r])}".encode()
                    for e in entries} for r in reversed(list(rows))}


WISHES = {0: ClaDecOptions(None, True), 2: ClaDecOptions(("avgpool",), False), 3: ClaDecOptions(None, True),
          4: ClaDecOptions(("layer2",), True)}


def test_alphas_pick_entries_per_layer():
    view = StandInView()
    assert [e.decoder_file for e in view.wanted(None, "all")] == ["dec2a", "dec2b", "dec9"]
    assert [e.decoder_file for e in view.wanted(None, "lowest")] == ["dec2a", "dec9"]  # each layer's lowest
    assert [e.decoder_file for e in view.wanted(None, (0.1,))] == ["dec2b"]
    assert [e.decoder_file for e in view.wanted(("avgpool",), (0.1,))] == []  # that layer lacks 0.1
    assert [e.decoder_file for e in view.wanted(None, (0.1 + 1e-17, 0.0))] == ["dec2a", "dec2b", "dec9"]
    assert view.alphas == (0.0, 0.1)


def test_lowest_alpha_and_jpeg_go_into_their_own_fields():
    view = StandInView()
    wishes = {0: ClaDecOptions(None, True, "lowest", "jpeg"), 1: ClaDecOptions(("layer2",), False, (0.1,), "png")}
    runner = ClaDecRunner(view, None)
    with runner.begin(np.arange(10, 12), wishes) as job:
        outcome = job.finish({"x": np.arange(20, 22)})
    assert outcome.error is None
    assert [e.wire() for e in outcome.images[0]] == [
        {"layer": "layer2", "alpha": 0.0, "reconstruction_jpeg": "ZGVjMmFAMjA=", "reference_jpeg": "cmVmMkAxMA=="},
        {"layer": "avgpool", "alpha": 0.0, "reconstruction_jpeg": "ZGVjOUAyMA==", "reference_jpeg": "cmVmOUAxMA=="}]
    assert [e.wire() for e in outcome.images[1]] == [{"layer": "layer2", "alpha": 0.1,
                                                     "reconstruction_png": "ZGVjMmJAMjE="}]
    assert [c[:3] for c in view.calls] == [("reconstructions", (0,), ("dec2a", "dec9")),
                                          ("reconstructions", (1,), ("dec2b",)),
                                          ("references", (0,), ("dec2a", "dec9"))]


@pytest.mark.parametrize("overlap", [True, False])
def test_rows_get_their_own_entries_whatever_order_the_view_returns(overlap):
    view = StandInView()
    runner = ClaDecRunner(view, _helper(overlap))
    x = np.arange(10, 15)
    with runner.begin(x, WISHES) as job:
        outcome = job.finish({"x": np.arange(20, 25)})
    assert outcome.error is None and outcome.wanted == frozenset(WISHES) and set(outcome.images) == set(WISHES)
    got = {r: [e.wire() for e in entries] for r, entries in outcome.images.items()}
    assert got[0] == [  # row 0: all layers, with references
        {"layer": "layer2", "alpha": 0.0, "reconstruction_png": "ZGVjMmFAMjA=", "reference_png": "cmVmMkAxMA=="},
        {"layer": "layer2", "alpha": 0.1, "reconstruction_png": "ZGVjMmJAMjA="},  # the layer's reference: once
        {"layer": "avgpool", "alpha": 0.0, "reconstruction_png": "ZGVjOUAyMA==", "reference_png": "cmVmOUAxMA=="}]
    assert [e.reconstruction_png for e in outcome.images[3]] == [b"dec2a@23", b"dec2b@23", b"dec9@23"]
    assert [e.reference_png for e in outcome.images[3]] == [b"ref2@13", None, b"ref9@13"]
    assert [(e.layer, e.reconstruction_png, e.reference_png) for e in outcome.images[2]] == [
        ("avgpool", b"dec9@22", None)]
    assert [e.reference_png for e in outcome.images[4]] == [b"ref2@14", None]
    refs = [c for c in view.calls if c[0] == "references"]
    assert sorted(c[1] for c in refs) == [(0, 3), (4,)]  # one run per group that wants references
    assert all(c[3].startswith("cladec") == overlap for c in refs)
    assert outcome.ms > 0
    runner.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_decode_runs_the_decoders_on_the_thread_after_the_references(overlap):
    """decode() starts the decoders on the runner's thread (queued behind the references);
    finish() then only merges. The answer equals one made without decode()."""
    view = StandInView()
    runner = ClaDecRunner(view, _helper(overlap))
    with runner.begin(np.arange(10, 15), WISHES) as job:
        job.decode({"x": np.arange(20, 25)})
        early = job.finish({"x": np.arange(20, 25)})
    with ClaDecRunner(view, None).begin(np.arange(10, 15), WISHES) as job:
        inline = job.finish({"x": np.arange(20, 25)})
    assert early.error is None and early.images == inline.images
    calls = view.calls[:len(view.calls) // 2]  # the first job's
    decoders = [c for c in calls if c[0] == "reconstructions"]
    assert decoders and all(c[3].startswith("cladec") == overlap for c in decoders)
    if overlap:  # one thread: every reference run came before the decoders
        kinds = [c[0] for c in calls]
        assert kinds.index("reconstructions") > max(i for i, k in enumerate(kinds) if k == "references")
    runner.close()


def test_decode_after_close_falls_back_to_in_line():
    view = StandInView()
    runner = ClaDecRunner(view, _helper(True))
    with runner.begin(np.arange(5), WISHES) as job:
        runner.close()
        job.decode({"x": np.arange(5)})
        outcome = job.finish({"x": np.arange(5)})
    assert outcome.error is None and set(outcome.images) == set(WISHES)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("broken", ["references", "reconstructions"])
def test_a_fault_is_carried_to_the_rows_that_wanted_cladec(overlap, broken, monkeypatch):
    view = StandInView()

    def fail(*args, **kwargs):
        raise RuntimeError("decoder fell over")

    monkeypatch.setattr(view, broken, fail)
    runner = ClaDecRunner(view, _helper(overlap))
    with runner.begin(np.arange(5), WISHES) as job:
        job.decode({"x": np.arange(5)})  # on the thread with overlap: the fault comes back through finish
        outcome = job.finish({"x": np.arange(5)})
    assert isinstance(outcome.error, RuntimeError) and outcome.wanted == frozenset(WISHES) and not outcome.images
    runner.close()


def test_no_wishes_no_work_and_close_stops_the_thread():
    view = StandInView()
    runner = ClaDecRunner(view, _helper(True))
    with runner.begin(np.arange(3), {}) as job:
        assert job.finish({"x": np.arange(3)}).wanted == frozenset()
    assert view.calls == []
    before = set(threading.enumerate())
    with runner.begin(np.arange(3), {1: ClaDecOptions(None, True)}) as job:
        job.finish({"x": np.arange(3)})
    threads = {t for t in set(threading.enumerate()) - before if t.name.startswith("cladec")}
    assert threads
    runner.close()
    runner.close()  # idempotent
    assert not any(t.is_alive() for t in threads)
    view.calls.clear()
    with runner.begin(np.arange(3), {1: ClaDecOptions(None, True)}) as job:  # after close: in line
        assert job.finish({"x": np.arange(3)}).error is None
    assert [c[3] for c in view.calls] == [threading.current_thread().name] * 2

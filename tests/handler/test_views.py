"""The views interface: a new view is one class and one registration, its parts reach the
answer, its errors fail only its rows, and later views read earlier parts."""
from __future__ import annotations

import base64
import json

from handlers.runtime.errors import InvalidOption
from handlers.runtime.service import ExplainerService, RawRequest
from handlers.runtime.settings import HandlerSettings
from handlers.runtime.views import Part, Rows, View


class RefuseClassTwo(View):
    """A toy view: refuses to explain class 2, and records which concepts it saw listed."""

    def __init__(self) -> None:
        self.seen: dict[int, list[str]] = {}

    def wants(self, req) -> bool:
        return True

    def row(self, rows: Rows, row: int, earlier) -> Part:
        if rows.targets[row] == 2:
            raise InvalidOption("class 2 is not explained here")
        listed = next((p.fields["concepts"] for p in earlier if "concepts" in p.fields), [])
        self.seen[row] = [c.id for c in listed]
        return Part(ms={"features": 0.0})  # a stage the answer model knows


def test_a_registered_view_runs_after_the_others(model_dir, sample_pngs):
    service = ExplainerService.load(model_dir, HandlerSettings(verify_fraction=0.0), gpu_id=None)
    toy = RefuseClassTwo()
    service.steps.append(toy)  # the one registration line
    try:
        data = base64.b64encode(sample_pngs[0]).decode()
        replies = service.handle_batch([
            RawRequest({"data": data, "target": 1, "images": False}, "application/json", True),
            RawRequest({"data": data, "target": 2, "images": False}, "application/json", True),
            RawRequest(sample_pngs[0], "image/png", False)])
        assert [r.status for r in replies] == [200, 400, 200]
        assert replies[1].body["error"] == {"type": "InvalidOption", "message": "class 2 is not explained here"}
        assert toy.seen[0] == [c["id"] for c in replies[0].body["concepts"]]  # read the concepts view's part
        assert replies[0].body["timings_ms"]["features"] == 0.0  # a later part's stage replaces an earlier one's
        assert json.loads(replies[2].wire_json())["predictions"]
    finally:
        service.close()


def test_the_answer_digest_is_deterministic(tiny_full_bundle, tiny_data):
    """bench.answer_digest, the before/after check of refactors, gives the same lines twice
    and covers every request kind (21 answers per image, the bad ones 4xx)."""
    from bench.answer_digest import OPTIONS, answers
    images = sorted((tiny_data / "test").glob("*/*.png"))[:2]
    first, second = answers(tiny_full_bundle, images), answers(tiny_full_bundle, images)
    assert first == second and len(first) == 2 * (len(OPTIONS) + 3)
    statuses = [json.loads(line)[0] for line in first[:len(OPTIONS) + 3]]
    assert statuses.count(200) >= 15 and statuses[-1] == 400

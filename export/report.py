"""See an explanation: a short text summary and a self-contained HTML report of ``/explanations`` answers.

The report is one HTML file with everything inline (CSS, images as ``data:`` URIs, no
scripts, fonts or network): per image, the prediction and target, the input with each
concept's heatmap laid over it (a CSS-only switch hides or shows the overlays), the
concepts as bars of effect with the intervention probabilities per state (and, when the
answer carries them, each concept's atlas strips: the training images where it fires), the ClaDec
triplets per layer and alpha, the class-feature contributions (subset, outside the subset,
runner-up), the bundle's validity figures and the timings. It renders the answer as the
typed model of ``handlers/runtime/answer.py`` checks it: an answer of the wrong shape is
refused with :class:`ReportError` before anything is written.
"""
from __future__ import annotations

import base64
import binascii
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from handlers.runtime.answer import Explanation


class ReportError(ValueError):
    """An input of the report is missing or malformed (the message is one line for people)."""


@dataclass(frozen=True)
class Section:
    """One explained image: its title (usually the file name), its bytes, and the answer body."""

    title: str
    image: bytes
    answer: dict[str, Any]


#: How the report says who answered a concept's interventions (the answer's ``source``).
SOURCE_WORDS = {"network": "the network (every state)",
                "network_interpolated": "the network (some states, the rest interpolated)",
                "bayesian_network": "the Bayesian network's tables"}


def check_answer(body: Any, where: str = "answer") -> dict[str, Any]:
    """``body`` if it is an ``/explanations`` body, else :class:`ReportError` naming the first problem."""
    if not isinstance(body, dict):
        raise ReportError(f"{where} is not an /explanations answer: expected a JSON object, got {type(body).__name__}")
    if "error" in body and "predictions" not in body:
        raise ReportError(f"{where} is an error answer: {json.dumps(body['error'])[:200]}")
    try:
        Explanation.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "/".join(str(p) for p in first["loc"]) or "(top level)"
        raise ReportError(f"{where} is not an /explanations answer: at {loc}: {first['msg']}") from None
    return body


def summary_lines(body: dict[str, Any], concepts: int = 5) -> list[str]:
    """The short text summary of one explanation (what ``demo-report`` and ``explain`` print)."""
    lines = []
    preds = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in body["predictions"][:3])
    lines.append(f"  predictions: {preds}; target: {body['target']['label']}")
    for c in body.get("concepts", [])[:concepts]:
        lines.append(f"  concept {c['id']:<10} name={c['name']:<10} state={c['state']} effect={c['effect']:+.4f} "
                     f"sensitivity={c['sensitivity']:.4f} answered by {SOURCE_WORDS.get(c['source'], c['source'])}")
        if "verified" in c:
            net = ", ".join(f"{i['probability']:.3f}" for i in c["verified"]["interventions"])
            served = ", ".join(f"{i['probability']:.3f}" for i in c["interventions"])
            lines.append(f"    verified: P(target | do(state)) served [{served}], network [{net}]; "
                         f"network effect {c['verified']['effect']:+.4f}")
    if "verification" in body:
        v = body["verification"]
        ccc = "n/a" if v["ccc"] is None else f"{v['ccc']:.3f}"
        lines.append(f"  verification over {v['concepts']} concepts: P(target | do) off by {v['mae_p']:.4f} on "
                     f"average, effect off by {v['effect_mae']:.4f}, CCC {ccc}, recall@3 {v['recall3']:.2f}")
    if "features" in body:
        ft = body["features"]
        top = ", ".join(f"#{c['index']} {c['contribution']:+.2f}" for c in ft["contributions"])
        lines.append(f"  features ({ft['layer']}, {ft['subset_size']} of the target's subset): {top}; "
                     f"decomposed head agrees: {ft['decomposed_agrees']}")
        o, ru = ft["outside_subset"], ft.get("runner_up")
        lines.append(f"    outside the subset: {o['positive']:+.2f} / {o['negative']:+.2f} (total {o['total']:+.2f}); "
                     f"held-out agreement {ft['decomposed_agreement_held_out']}")
        if ru:
            lines.append(f"    runner-up {ru['label']}: logit {ru['logit']:+.2f}, decomposed "
                         f"{ru['decomposed_logit']:+.2f}, outside the subset {ru['outside_subset']['negative']:+.2f} negative")
    if "concepts" in body.get("validity", {}):
        v = body["validity"]["concepts"]
        t = v.get("effect_truth")
        if t:
            lines.append(f"  bundle validity (held out, probability units): P(target | do) off by {t['mae_p']}, "
                         f"effect skill {t['skill']}, CCC {t['ccc']}, nDCG@5 {t['ndcg5']}, recall@3 {t['recall3']}")
        lines.append(f"  fidelity {v['fidelity']}; failed checks: {', '.join(v['failed_checks']) or 'none'}")
    lines.append("  timings (ms): " + ", ".join(f"{k}={v}" for k, v in body["timings_ms"].items()))
    return lines


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:12px 20px}header h1{font-size:18px;margin:0}
header p{margin:4px 0 0;color:#c9d1dc;font-size:12px}
section.image{background:#fff;margin:16px;padding:16px 20px;border-radius:8px;box-shadow:0 1px 3px #0002}
h2{font-size:16px;margin:0 0 8px}h3{font-size:14px;margin:18px 0 6px;color:#3a4556}
.pred{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}
.stack{position:relative;display:inline-block;line-height:0}
.stack img{width:var(--px);height:var(--px);image-rendering:pixelated;border:1px solid #ccd}
.stack img.heat{position:absolute;left:0;top:0;border-color:transparent;opacity:.75}
.big{--px:192px}.small{--px:96px}.tiny{--px:72px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #e3e6ea;text-align:left}
th{font-weight:600;color:#3a4556}td.num{text-align:right;font-variant-numeric:tabular-nums}
.concepts{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px}
.concept{display:flex;gap:10px;border:1px solid #e3e6ea;border-radius:6px;padding:8px}
.concept .meta{flex:1;min-width:0}.concept b{font-size:13px}
.bar{height:10px;background:#eef0f3;position:relative;margin:3px 0}
.bar i{position:absolute;top:0;height:10px}.pos{background:#2f7d4f}.neg{background:#b3403a}
.bar.signed::after{content:"";position:absolute;left:50%;top:-2px;height:14px;border-left:1px solid #666}
.states{display:flex;gap:4px;align-items:flex-end;height:42px;margin-top:4px}
.states span{width:26px;background:#6d8fc7;position:relative;font-size:10px;color:#333}
.states span.obs{background:#1d4e9e}
.states.net span{background:#c9a227}.label.verified{margin-top:18px}
.states em{position:absolute;bottom:-14px;left:0;right:0;text-align:center;font-style:normal}
.label{font-size:11px;color:#5b6675}
.triplets{display:flex;flex-wrap:wrap;gap:14px}.triplet{display:flex;gap:6px;align-items:flex-start}
.triplet figure{margin:0;text-align:center}figcaption{font-size:11px;color:#5b6675;line-height:1.2;margin-top:3px}
.switch{font-size:12px;color:#3a4556;margin:6px 0}
input.toggle:not(:checked)~.concepts img.heat{display:none}
.concept{flex-wrap:wrap}.atlas{flex-basis:100%;margin-top:4px}
.atlas img{display:block;height:48px;max-width:100%;image-rendering:pixelated;border:1px solid #ccd;margin-top:2px}
.warn{color:#8a3b00}.ok{color:#2f7d4f}
"""


def _data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


_SIGNATURES = {"png": (b"\x89PNG", "image/png"), "jpeg": (b"\xff\xd8\xff", "image/jpeg")}


def _b64_image(text: str, where: str, kind: str = "png") -> str:
    """A base64 image of the answer (PNG, or ``kind`` "jpeg") as a data URI, after checking
    that it decodes to that format."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ReportError(f"{where} is not valid base64") from None
    magic, mime = _SIGNATURES[kind]
    if not raw.startswith(magic):
        raise ReportError(f"{where} is not a {kind.upper()}")
    return _data_uri(raw, mime)


def _entry_image(entry: dict[str, Any], field: str, where: str) -> str | None:
    """The data URI of a ClaDec entry's ``field`` ("reconstruction", "reference") in whichever
    format the answer carries it, or None."""
    for kind in _SIGNATURES:
        if f"{field}_{kind}" in entry:
            return _b64_image(entry[f"{field}_{kind}"], where, kind)
    return None


def _image_uri(image: bytes, title: str) -> tuple[str, int]:
    """The input image as a PNG data URI and its width (any format Pillow reads)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
            return _data_uri(out.getvalue()), im.width
    except (UnidentifiedImageError, OSError) as exc:
        raise ReportError(f"{title} is not an image Pillow can read ({exc})") from None


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def _signed_bar(value: float, scale: float) -> str:
    """A bar from the centre: right and green for positive, left and red for negative."""
    w = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0) * 50
    left = 50 if value >= 0 else 50 - w
    cls = "pos" if value >= 0 else "neg"
    return f'<div class="bar signed"><i class="{cls}" style="left:{left:.1f}%;width:{w:.1f}%"></i></div>'


def _atlas(c: dict[str, Any]) -> str:
    """A concept card's atlas strips (the answer's ``atlas``, with ``"atlas": true``), or ""."""
    a = c.get("atlas")
    if not a:
        return ""
    cid = _e(c["id"])
    rows = [f'<div class="label">training images where it fires most (crops of {a["crop_px"][0]}×{a["crop_px"][1]} '
            f'input pixels around its peak)</div><img class="atlas-top" data-atlas="{cid}" '
            f'alt="training images where {cid} fires most" title="{_e(", ".join(a["top_images"]))}" '
            f'src="{_b64_image(a["top_png"], c["id"] + " atlas")}">']
    if "low_png" in a:
        rows.append(f'<div class="label">where it is lowest</div><img class="atlas-low" data-atlas="{cid}" '
                    f'alt="training images where {cid} is lowest" title="{_e(", ".join(a["low_images"]))}" '
                    f'src="{_b64_image(a["low_png"], c["id"] + " atlas")}">')
    return f'<div class="atlas">{"".join(rows)}</div>'


def _concepts(body: dict[str, Any], input_uri: str) -> str:
    concepts = body.get("concepts")
    if not concepts:
        return ""
    scale = max(abs(c["effect"]) for c in concepts) or 1.0
    cards = []
    for c in concepts:
        heat = ""
        if "heatmap_png" in c:
            heat = f'<img class="heat" alt="heatmap of {_e(c["id"])}" src="{_b64_image(c["heatmap_png"], c["id"])}">'
        states = "".join(
            f'<span class="{"obs" if i["state"] == c["state"] else ""}" style="height:{max(i["probability"], 0.0) * 100:.0f}%"'
            f' title="P(target | do(state {i["state"]})) = {i["probability"]:.4f}"><em>{i["state"]}</em></span>'
            for i in c["interventions"])
        verified = ""
        if "verified" in c:
            v = c["verified"]
            net = "".join(
                f'<span class="net" style="height:{max(i["probability"], 0.0) * 100:.0f}%" title="the network\'s '
                f'P(target | do(state {i["state"]})) = {i["probability"]:.4f}"><em>{i["state"]}</em></span>'
                for i in v["interventions"])
            verified = (f'<div class="label verified">network (verify): effect <b>{v["effect"]:+.4f}</b> · mean '
                        f'|served − network| {v["abs_error"]:.4f}</div>{_signed_bar(v["effect"], scale)}'
                        f'<div class="states net" data-verified="{_e(c["id"])}">{net}</div>')
        name = c["name"] if c["name"] == c["id"] else f'{c["name"]} ({c["id"]})'
        atlas = _atlas(c)
        cards.append(
            f'<div class="concept" data-concept="{_e(c["id"])}">'
            f'<div class="stack tiny"><img alt="input" src="{input_uri}">{heat}</div>'
            f'<div class="meta"><b>{_e(name)}</b><div class="label">state {c["state"]} · activation '
            f'{_fmt(c["activation"])} · effect <b>{c["effect"]:+.4f}</b> · sensitivity {c["sensitivity"]:.4f}'
            f' · answered by {_e(SOURCE_WORDS.get(c.get("source", "bayesian_network"), "?"))}</div>'
            f'{_signed_bar(c["effect"], scale)}'
            f'<div class="label">P(target | do(state)) — observed state dark</div><div class="states">{states}</div>'
            f'{verified}</div>{atlas}</div>')
    has_heat = any("heatmap_png" in c for c in concepts)
    toggle = ('<input class="toggle" type="checkbox" id="t{id}" checked> <label class="switch" for="t{id}">'
              'heatmaps over the input</label>') if has_heat else ""
    check = ""
    if "verification" in body:
        v = body["verification"]
        check = (f'<p class="label verification">Verified against the network\'s own interventions over '
                 f'{v["concepts"]} concepts: P(target | do(state)) off by {v["mae_p"]:.4f} on average, effect off by '
                 f'{v["effect_mae"]:.4f}, Lin\'s CCC {_fmt(v["ccc"])}, recall@3 {v["recall3"]:.2f}.</p>')
    return (f'<h3>Concepts: causal effect on the target (sorted by |effect|)</h3>{toggle}{check}'
            f'<div class="concepts">{"".join(cards)}</div>')


def _cladec(body: dict[str, Any], input_uri: str) -> str:
    entries = body.get("cladec")
    if not entries:
        return ""
    out = []
    references: dict[str, str] = {}  # the answer sends a layer's reference image with its first entry
    for e in entries:
        where = f'cladec {e["layer"]} alpha {e["alpha"]}'
        figs = [f'<figure><div class="stack small"><img alt="input" src="{input_uri}"></div><figcaption>input</figcaption></figure>']
        reference = _entry_image(e, "reference", where)
        if reference is not None:
            references[e["layer"]] = reference
        if e["layer"] in references:
            figs.append(f'<figure><div class="stack small"><img class="cladec-ref" alt="reference autoencoder" '
                        f'src="{references[e["layer"]]}"></div><figcaption>reference AE</figcaption></figure>')
        figs.append(f'<figure><div class="stack small"><img class="cladec-rec" alt="ClaDec" '
                    f'src="{_entry_image(e, "reconstruction", where)}"></div><figcaption>ClaDec α={e["alpha"]:g}'
                    f'</figcaption></figure>')
        out.append(f'<div class="triplet" data-cladec="{_e(e["layer"])}/{e["alpha"]:g}"><div><b>{_e(e["layer"])}</b>'
                   f'</div>{"".join(figs)}</div>')
    return ('<h3>ClaDec: what the classifier keeps at each layer (input, reference autoencoder, ClaDec)</h3>'
            f'<div class="triplets">{"".join(out)}</div>')


def _features(body: dict[str, Any]) -> str:
    ft = body.get("features")
    if not ft:
        return ""
    contributions = ft["contributions"]
    o = ft["outside_subset"]
    scale = max([abs(c["contribution"]) for c in contributions] + [abs(o["positive"]), abs(o["negative"])]) or 1.0
    rows = [f'<tr><td>#{c["index"]}</td><td class="num">{c["contribution"]:+.3f}</td>'
            f'<td class="num">{_fmt(c["share"], 3)}</td><td style="width:220px">{_signed_bar(c["contribution"], scale)}</td></tr>'
            for c in contributions]
    rows.append(f'<tr><td>outside the subset, positive</td><td class="num">{o["positive"]:+.3f}</td><td></td>'
                f'<td>{_signed_bar(o["positive"], scale)}</td></tr>')
    rows.append(f'<tr><td>outside the subset, negative</td><td class="num">{o["negative"]:+.3f}</td><td></td>'
                f'<td>{_signed_bar(o["negative"], scale)}</td></tr>')
    ru = ft.get("runner_up")
    runner = ""
    if ru:
        runner = (f'<p class="label">runner-up {_e(ru["label"])}: logit {ru["logit"]:+.3f}, decomposed '
                  f'{ru["decomposed_logit"]:+.3f}, outside its subset {ru["outside_subset"]["total"]:+.3f}</p>')
    agrees = "agrees" if ft["decomposed_agrees"] else "disagrees"
    return (f'<h3>Class-specific features ({_e(ft["layer"])}, {ft["subset_size"]} of the target\'s subset)</h3>'
            f'<p class="label">the decomposed head {agrees} with the full head here; held-out agreement '
            f'{_fmt(ft["decomposed_agreement_held_out"])}</p>'
            f'<table class="features"><tr><th>feature</th><th>contribution</th><th>share</th><th></th></tr>'
            f'{"".join(rows)}</table>{runner}')


def _validity(body: dict[str, Any]) -> str:
    v = body.get("validity", {})
    rows = []
    c = v.get("concepts")
    if c:
        layers = ", ".join(f"{k} {_fmt(x)}" for k, x in (c.get("causal_spearman_per_layer") or {}).items())
        t = c.get("effect_truth")
        if t:
            rows += [("error of P(target | do(state)) against the network", _fmt(t.get("mae_p"))),
                     ("effect skill over 'no effect' / Lin's CCC", f'{_fmt(t.get("skill"))} / {_fmt(t.get("ccc"))}'),
                     ("per image nDCG@5 / recall@3", f'{_fmt(t.get("ndcg5"))} / {_fmt(t.get("recall3"))}'),
                     ("CCC per layer", ", ".join(f"{k} {_fmt(x)}" for k, x in t["ccc_per_layer"].items()) or "–")]
        rows += [("autoencoder agreement (worst layer)", _fmt(c.get("agreement_min"))),
                 ("network fidelity", _fmt(c.get("fidelity"))),
                 ("Spearman pooled / per image (diagnostic)", f'{_fmt(c.get("causal_spearman"))} / '
                                                                  f'{_fmt(c.get("causal_spearman_per_image"))}'),
                 ("Spearman per layer (diagnostic)", layers or "–"),
                 ("interventions at unseen parent configurations", _fmt(c.get("unseen_configurations"))),
                 ("failed checks", ", ".join(c.get("failed_checks") or []) or "none")]
    f = v.get("features")
    if f:
        rows.append(("features: decomposed head's held-out agreement", _fmt(f.get("decomposed_agreement"))))
    passed = v.get("passed")
    verdict = ('<p class="ok">every concept check passed</p>' if passed else
               '<p class="warn">some concept checks failed: read the concept view with care</p>') if c else ""
    table = "".join(f"<tr><td>{_e(k)}</td><td>{x}</td></tr>" for k, x in rows)
    return f'<h3>How far to trust it (the bundle\'s held-out figures)</h3>{verdict}<table class="validity">{table}</table>'


def _timings(body: dict[str, Any]) -> str:
    cells = "".join(f'<tr><td>{_e(k)}</td><td class="num">{_fmt(v)}</td></tr>' for k, v in body["timings_ms"].items())
    return f'<h3>Timings (ms, in the server)</h3><table class="timings">{cells}</table>'


def _section(i: int, s: Section) -> str:
    body = check_answer(s.answer, f"answer of {s.title}")
    input_uri, _ = _image_uri(s.image, s.title)
    preds = "".join(f'<tr><td>{_e(p["label"])}</td><td class="num">{p["probability"]:.4f}</td></tr>'
                    for p in body["predictions"])
    t = body["target"]
    head = (f'<div class="pred"><div class="stack big"><img class="input" alt="input {_e(s.title)}" src="{input_uri}">'
            f'</div><div><p>target: <b>{_e(t["label"])}</b> (class {t["index"]})</p><table class="predictions">'
            f'<tr><th>class</th><th>probability</th></tr>{preds}</table><p class="label">model '
            f'{_e(body["model"]["name"])} {_e(body["model"]["version"])} · bundle sha256 '
            f'{_e(body["model"]["artifact_sha256"][:12])}</p></div></div>')
    concepts = _concepts(body, input_uri).replace('id="t{id}"', f'id="t{i}"').replace('for="t{id}"', f'for="t{i}"')
    return (f'<section class="image" id="image-{i}"><h2>{_e(s.title)}</h2>{head}{concepts}{_cladec(body, input_uri)}'
            f'{_features(body)}{_validity(body)}{_timings(body)}</section>')


def render_html(sections: Sequence[Section], title: str = "Concept explanations") -> str:
    """One self-contained HTML page with a section per explained image."""
    if not sections:
        raise ReportError("nothing to report: no explained images")
    parts = [_section(i, s) for i, s in enumerate(sections)]
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{_e(title)}</title><style>{_CSS}</style></head><body>'
            f'<header><h1>{_e(title)}</h1><p>torchserve-concept-explainer · {len(sections)} image(s) · '
            'causal concept attributions, ClaDec, class-specific features</p></header>'
            f'{"".join(parts)}</body></html>\n')


def write_report(sections: Sequence[Section], out: Path, title: str = "Concept explanations") -> Path:
    """Render and write the report (the folder is created); returns ``out``."""
    page = render_html(sections, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def load_answers(path: Path) -> list[dict[str, Any]]:
    """The answers in ``path``: one ``/explanations`` body, or a list of them."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    answers = data if isinstance(data, list) else [data]
    return [check_answer(a, f"{path}" + (f"[{i}]" if isinstance(data, list) else "")) for i, a in enumerate(answers)]

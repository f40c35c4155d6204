"""The experiment report: ONE self-contained HTML page (+ a JSON file with the same numbers).

Input is a plain *results* mapping (JSON-compatible; the orchestrator writes it as
``<exp_dir>/results.json``). Every key is optional except ``experiment``; a missing part renders as
a section that says it is not available yet, so the page always has every section::

    {
      "experiment": "demo",
      "classes": ["background", ...],                       # default: VOC
      "generated_at": "...",                                 # optional
      "settings": {"target": "...", "n3": 2, ...},           # free-form key -> value
      "rounds": [{"round": 1, "|M|": 57, "|S|": 10, ...}],   # free-form rows
      "table1": {                                            # = projects.evaluation.evaluate.table1()
        "columns": [{"name": "T(0)", "size": 7, "drawn_round": 0, "note": ""}, ...],
        "rows": [{"key": "f(0)", "label": "...", "role": "target" | "competitor" | ...,
                  "round": 0, "version": "...", "miou": {"T(0)": 0.61, ...},
                  "gt_miou": {"T(0)": 0.63, ...},            # ground-truth-class mIoU (optional)
                  "gate": {"status": "promoted" | "rejected" | ..., "reasons": [...]},  # optional
                  "drawn_against": {"T(1)": true, ...}}, ...]},
      "help": {                                              # = projects.evaluation.evaluate.round_help()
        "reference": "f(0)", "served": "f(2)", "confidence": 0.95, "failure_zone": ["T(1)", ...],
        "rows": [{"model": "f(1)", "served": false, "images": 55, "reference_gt_miou": 0.4,
                  "gt_miou": 0.45, "gain": 0.05, "ci": [0.01, 0.09], "gain_miou": 0.04,
                  "t0_gain": -0.002, "sets": ["T(1) (27)", ...]}, ...],
        "effort": {"total": {"ratings": 90, "masks": 40, "lead_time_s": 0.0}, "simulated": true,
                   "rounds": [{"round": 1, "ratings": 45, "masks": 20}, ...]}},
      "failures": {"columns": ["round 1 candidates", "round 1 low-rated", ...],
                   "counts": {"person": {"round 1 candidates": 12, ...}, ...}},
      "baseline": {"test_set": "...", "budget": 10, "columns": ["mIoU on T_MAD", ...],
                   "rows": [{"method": "MAD", "model": "...", "values": {"mIoU on T_MAD": 0.5}}],
                   "note": "..."},
      "srcc": {"T(1)": {"models": [...], "ks": [1, ...], "srcc": [0.4, ..., 1.0]}, ...},
                                                             # = projects.evaluation.evaluate.ranking_curves()
      "galleries": {"candidates": [ITEM, ...], "lowest_rated": [...], "before_after": [...]},
      "stages": [{"where": "round-1", "stage": "score", "seconds": 12.3}, ...]
    }
    ITEM = {"image": "round-1/images/x.jpg", "image_id": "...", "caption": "...",
            "panels": [{"title": "target f(0)", "mask": "round-1/pred/x.png", "note": "MOS 1.3"},
                       {"title": "photo", "mask": null}, ...]}

Paths are relative to ``base_dir`` (the folder of ``results.json``) or absolute. A panel's
``mask`` may also be an (H, W) array or a zero-argument callable returning one (in-memory use);
masks (mode-P/L PNG class indices, any size) are drawn over the photo in VOC colours, loaded
one at a time when rendered. mIoU values are fractions in [0, 1]; the page shows them x 100.

:func:`render_report` writes ``report.html`` and ``report.json`` atomically.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ml_backend.atomic import atomic_write_json, atomic_write_text
from ml_backend.classes import IGNORE_INDEX, VOC_CLASSES, voc_palette
from ml_backend.errors import MadsegError
from ml_backend.jsonsafe import jsonable
from ml_backend.round_dirs import round_number

from ..layout import RESULTS_FILE as RESULTS_FILE  # re-exported: the file the report reads
from ..layout import ROUND_PREFIX, STATE_FILE
from ..overlay import DEFAULT_ALPHA, blend

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
#: Gallery keys rendered first, in this order, with these titles (other keys follow).
GALLERY_TITLES: dict[str, tuple[str, str]] = {
    "candidates": (
        "MAD candidates",
        "Images on which the target and a competitor disagree most; each row shows the photo and "
        "the predictions side by side.",
    ),
    "lowest_rated": (
        "Lowest-rated images",
        "The images the raters scored lowest (mean opinion score): the target's failures that went "
        "to pixel labelling.",
    ),
    "before_after": (
        "Before and after fine-tuning",
        "Test images: ground truth, the target's predictions before fine-tuning (f(0)) and those of "
        "the model served at the end; a fine-tuned version the promotion gate rejected is shown "
        "marked as such, never as the result.",
    ),
}
SECTION_IDS = ("summary", "table1", "help", "failures", "baseline", "srcc", "galleries", "stages")

MaskLike = str | os.PathLike[str] | np.ndarray | Callable[[], np.ndarray] | None


# =============================================================================================
# pure helpers
# =============================================================================================


def count_failures(
    image_classes: Mapping[str, Collection[str]], groups: Mapping[str, Collection[str]]
) -> dict[str, Any]:
    """Per-class counts for the ``failures`` section.

    ``image_classes``: image id -> class names it counts for (e.g. the classes of the MAD problems
    that selected it, or its main class); ``groups``: column name -> image ids (e.g.
    ``{"round 1 candidates": M1, "round 1 low-rated": S1}``). Returns
    ``{"columns": [...], "counts": {class: {column: n}}}`` with classes in first-seen order.
    """
    counts: dict[str, dict[str, int]] = {}
    for col, ids in groups.items():
        for iid in ids:
            for cls in image_classes.get(iid, ()):
                counts.setdefault(cls, {c: 0 for c in groups})[col] += 1
    return {"columns": list(groups), "counts": counts}


def overlay(image: np.ndarray, mask: np.ndarray | None, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """A gallery picture: the raters' overlay look (:func:`projects.overlay.blend`) of ``mask``
    ((h, w) class indices, resized to the photo) over ``image`` (H, W, 3) uint8; the photo itself
    when ``mask`` is None. Returns (H, W, 3) uint8."""
    return image if mask is None else blend(image, mask, alpha)


def png_base64(rgb: np.ndarray) -> str:
    """(H, W, 3) uint8 -> a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# =============================================================================================
# validation of the results mapping
# =============================================================================================


@dataclass
class ReportInput:
    """The validated results (see the module docstring) plus where relative paths start."""

    data: dict[str, Any]
    base_dir: Path
    classes: list[str]
    source: str = "results"
    warnings: list[str] = field(default_factory=list)

    def path(self, p: str | os.PathLike[str]) -> Path:
        p = Path(p)
        return p if p.is_absolute() else self.base_dir / p


def _need(cond: bool, source: str, key: str, what: str) -> None:
    if not cond:
        raise MadsegError(f"{source}: {key} {what}; re-run the evaluation that writes it")


def _need_fields(value: Any, fields: Mapping[str, type], source: str, where: str, what: str) -> None:
    """:func:`_need` that ``value`` is an object whose ``fields`` (key -> type) have those types."""
    _need(isinstance(value, Mapping) and all(isinstance(value.get(k), t) for k, t in fields.items()),
          source, where, what)


def _is_num(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def validate_results(
    results: Mapping[str, Any], base_dir: str | os.PathLike[str], source: str = "results"
) -> ReportInput:
    """Check the structure of a results mapping; :class:`MadsegError` naming ``source`` and key."""
    _need(isinstance(results, Mapping), source, "the top level", "must be a JSON object")
    _need(isinstance(results.get("experiment"), str), source, "'experiment'", "must be the experiment name")
    classes = results.get("classes", list(VOC_CLASSES))
    _need(
        isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) >= 2,
        source,
        "'classes'",
        "must be a list of class names",
    )
    t1 = results.get("table1")
    if t1 is not None:
        _need_fields(t1, {"columns": list, "rows": list}, source, "'table1'",
                     "must have 'columns' and 'rows' lists")
        names = []
        for j, c in enumerate(t1["columns"]):
            _need(
                isinstance(c, Mapping) and isinstance(c.get("name"), str),
                source,
                f"table1.columns[{j}]",
                "must have a 'name'",
            )
            names.append(c["name"])
        for j, r in enumerate(t1["rows"]):
            _need(
                isinstance(r, Mapping) and isinstance(r.get("key", r.get("label")), str),
                source,
                f"table1.rows[{j}]",
                "must have a 'key'",
            )
            miou = r.get("miou", {})
            _need(
                isinstance(miou, Mapping) and all(_is_num(v) for v in miou.values()),
                source,
                f"table1.rows[{j}].miou",
                "must map test-set names to numbers or null",
            )
    hp = results.get("help")
    if hp is not None:
        _need(isinstance(hp, Mapping) and isinstance(hp.get("rows"), list)
              and all(isinstance(r, Mapping) and isinstance(r.get("model"), str) for r in hp["rows"]),
              source, "'help'", "must have a 'rows' list of {model, gain, ci, ...}")
        for j, r in enumerate(hp["rows"]):
            ci = r.get("ci")
            _need(_is_num(r.get("gain")) and (ci is None or (isinstance(ci, list) and len(ci) == 2
                                                             and all(_is_num(v) for v in ci))),
                  source, f"help.rows[{j}]", "needs a numeric 'gain' and 'ci' = [low, high] or null")
    fl = results.get("failures")
    if fl is not None:
        _need_fields(fl, {"columns": list, "counts": Mapping}, source, "'failures'",
                     "must have 'columns' and 'counts'")
    bl = results.get("baseline")
    if bl is not None:
        _need_fields(bl, {"columns": list, "rows": list}, source, "'baseline'",
                     "must have 'columns' and 'rows' lists")
    sr = results.get("srcc")
    if sr is not None:
        _need(isinstance(sr, Mapping), source, "'srcc'", "must map test-set names to curves")
        for name, c in sr.items():
            _need(
                isinstance(c, Mapping)
                and isinstance(c.get("ks"), list)
                and isinstance(c.get("srcc"), list)
                and len(c["ks"]) == len(c["srcc"])
                and all(_is_num(v) for v in c["srcc"]),
                source,
                f"srcc[{name!r}]",
                "must have equally long 'ks' and 'srcc' lists",
            )
    ga = results.get("galleries")
    if ga is not None:
        _need(isinstance(ga, Mapping), source, "'galleries'", "must map gallery names to lists of items")
        for gname, items in ga.items():
            _need(isinstance(items, list), source, f"galleries[{gname!r}]", "must be a list")
            for j, it in enumerate(items):
                where = f"galleries[{gname!r}][{j}]"
                _need(
                    isinstance(it, Mapping) and it.get("image") is not None, source, where, "needs an 'image'"
                )
                panels = it.get("panels", [])
                _need(
                    isinstance(panels, list) and all(isinstance(p, Mapping) for p in panels),
                    source,
                    f"{where}.panels",
                    "must be a list of {title, mask, note}",
                )
    return ReportInput(dict(results), Path(base_dir), list(classes), source)


# =============================================================================================
# rendering
# =============================================================================================

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;
  color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1e0}
nav{padding:8px 32px;background:#e9edf3;font-size:13px}
nav a{margin-right:14px;color:#2a4d8f}
main{padding:8px 32px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:14px 20px;margin:16px 0}
h2{font-size:18px;margin:4px 0 10px}
h3{font-size:15px;margin:14px 0 6px}
p.note{color:#5b6475;margin:4px 0 10px;font-size:13px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:6px 0}
th,td{border:1px solid #dde2ea;padding:4px 10px;text-align:right}
th{background:#f0f3f7;font-weight:600}
td.l,th.l{text-align:left}
tr.target td.l{font-weight:600}
td.best{background:#e3f3e6;font-weight:700}
span.role{display:inline-block;font-size:11px;padding:0 6px;
  border-radius:8px;margin-left:6px;background:#e9edf3;color:#44506a}
span.role.target{background:#dce8fb;color:#1f4d99}
span.role.competitor{background:#f3e8d8;color:#7a4b12}
span.gate{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;margin-left:6px}
span.gate.promoted{background:#dff3e3;color:#1d6b2f}
span.gate.rejected{background:#fbe0dd;color:#9a2116}
small.why{color:#9a2116;font-size:11px}
p.headline{font-size:15px;font-weight:600;margin:6px 0 10px}
small.v{color:#7b8496;font-size:11px}
sup.rank{color:#7b8496;font-size:10px;margin-left:2px}
.missing{color:#8a5a00;background:#fff6e0;
  border:1px dashed #e0c070;padding:8px 12px;border-radius:6px}
.gallery .item{display:flex;flex-wrap:wrap;gap:8px;
  align-items:flex-start;margin:10px 0;padding:8px 0;border-top:1px solid #eef1f5}
.gallery figure{margin:0;text-align:center}
.gallery figure img{display:block;border-radius:4px}
.gallery figcaption{font-size:12px;color:#333;max-width:260px}
.gallery figcaption em{color:#6b7385;font-style:normal}
.gallery .cap{font-size:12px;color:#44506a;width:100%;margin-bottom:2px}
.legend{display:flex;flex-wrap:wrap;gap:6px 14px;font-size:12px;margin:4px 0 8px}
.legend span.sw{display:inline-block;width:13px;height:13px;
  border-radius:3px;vertical-align:-2px;margin-right:4px;border:1px solid #0002}
img.plot{max-width:100%}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}"


def _missing(what: str) -> str:
    return f'<p class="missing">{_e(what)}</p>'


def _section(sid: str, title: str, body: str, note: str = "") -> str:
    n = f'<p class="note">{_e(note)}</p>' if note else ""
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{n}{body}</section>'


def _kv_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    head = "".join(
        f'<th class="l">{_e(c)}</th>' if j == 0 else f"<th>{_e(c)}</th>" for j, c in enumerate(cols)
    )
    body = ""
    for r in rows:
        cells = []
        for j, c in enumerate(cols):
            v = r.get(c, "")
            v = f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else v)
            cells.append(f'<td class="l">{_e(v)}</td>' if j == 0 else f"<td>{_e(v)}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(ri: ReportInput) -> str:
    d = ri.data
    parts = []
    settings = d.get("settings") or {}
    if settings:
        rows = "".join(
            f'<tr><td class="l">{_e(k)}</td><td class="l">{_e(v)}</td></tr>' for k, v in settings.items()
        )
        parts.append(f"<h3>Settings</h3><table>{rows}</table>")
    rounds = d.get("rounds") or []
    if rounds:
        parts.append("<h3>Rounds</h3>" + _kv_table(rounds))
    body = "".join(parts) or _missing("No settings or round summary recorded yet.")
    return _section("summary", "Experiment", body)


def _table1(ri: ReportInput) -> str:
    t1 = ri.data.get("table1")
    title = "Table 1: mIoU of every model on every test set"
    if not t1 or not t1.get("rows") or not t1.get("columns"):
        return _section(
            "table1", title, _missing("No evaluation yet: finish a round and re-run `madseg report`.")
        )
    cols = t1["columns"]
    names = [c["name"] for c in cols]
    best: dict[str, float] = {}
    ranks: dict[tuple[str, str], int] = {}
    for n in names:
        vals = [
            (float(r["miou"][n]), r.get("key", r.get("label")))
            for r in t1["rows"]
            if r.get("miou", {}).get(n) is not None
        ]
        if vals:
            best[n] = max(v for v, _ in vals)
            for rank, (_v, k) in enumerate(sorted(vals, key=lambda t: -t[0]), 1):
                ranks[(k, n)] = rank
    head = (
        '<tr><th class="l">model</th>'
        + "".join(
            f'<th>{_e(c["name"])}<br><small class="v">n={_e(c.get("size", "?"))}'
            + (f", round {_e(c['drawn_round'])}" if c.get("drawn_round") else "")
            + "</small></th>"
            for c in cols
        )
        + "</tr>"
    )
    body = ""
    any_drawn = any_gate = any_gt = False
    for r in t1["rows"]:
        key = r.get("key", r.get("label"))
        role = r.get("role", "")
        label = r.get("label") or key
        ver = r.get("version") or ""
        gate = r.get("gate") or {}
        status = gate.get("status")
        badge = ""
        if status:
            reason = "; ".join(gate.get("reasons") or [])
            badge = f'<span class="gate {_e(status)}" title="{_e(reason)}">{_e(status)}</span>'
            any_gate = True
        cell0 = (
            f'<td class="l">{_e(label)}<span class="role {_e(role)}">{_e(role)}</span>{badge}'
            + (f'<br><small class="v">{_e(ver)}</small>' if ver else "")
            + (f'<br><small class="why">{_e("; ".join(gate.get("reasons") or []))}</small>'
               if status == "rejected" else "")
            + "</td>"
        )
        cells = []
        for n in names:
            v = r.get("miou", {}).get(n)
            drawn = bool((r.get("drawn_against") or {}).get(n))
            any_drawn |= drawn and v is not None
            cls = ' class="best"' if v is not None and n in best and float(v) == best[n] else ""
            rk = f'<sup class="rank">#{ranks[(key, n)]}</sup>' if (key, n) in ranks else ""
            mark = "†" if drawn and v is not None else ""
            g = (r.get("gt_miou") or {}).get(n)
            gt = f'<br><small class="v">gt {_pct(g)}</small>' if g is not None else ""
            any_gt |= g is not None
            cells.append(f"<td{cls}>{_pct(v)}{mark}{rk}{gt}</td>")
        body += f'<tr class="{_e(role)}">{cell0}{"".join(cells)}</tr>'
    note = (
        "Dataset-level mIoU x 100 (confusion matrices summed over the test set). #k = rank in the "
        "column; the best value is highlighted."
    )
    if any_gt:
        note += (
            " gt = ground-truth-class mIoU: the mean over the classes present in the test set's ground "
            "truth, so a class the model only predicts (one spurious blob) cannot add a zero to the mean."
        )
    if any_gate:
        note += (
            " promoted / rejected = the promotion gate's verdict on a fine-tuned target (hover for the "
            "reasons): only a promoted version was served and became the next round's target."
        )
    if any_drawn:
        note += (
            " † = the test set was drawn against this model (its failures were sought), so it is biased low."
        )
    return _section("table1", title, f"<table>{head}{body}</table>", note)


def _signed(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):+.1f}"


def _help(ri: ReportInput) -> str:
    hp = ri.data.get("help")
    title = "Did the round help?"
    if not hp or not hp.get("rows"):
        return _section("help", title,
                        _missing("No fine-tuned model evaluated on a failure-zone test set yet."))
    ref = hp.get("reference", "f(0)")
    conf = float(hp.get("confidence") or 0.95)
    parts = []
    served = next((r for r in hp["rows"] if r.get("served")), None)
    if served is not None:
        if served["model"] == ref:
            head = (f"The served model is still {ref}: no fine-tuned version passed the promotion gate, "
                    "so the rounds changed nothing that is served.")
        else:
            ci = served.get("ci")
            ci_txt = f" ({conf:.0%} interval {_signed(ci[0])} to {_signed(ci[1])})" if ci else ""
            head = (f"Served model {served['model']}: {_signed(served.get('gain'))} points of "
                    f"ground-truth-class mIoU over {ref} on {served.get('images', 0)} failure-zone "
                    f"images{ci_txt}; "
                    f"{_signed(served.get('t0_gain'))} on T(0).")
        parts.append(f'<p class="headline">{_e(head)}</p>')
    rows = []
    for r in hp["rows"]:
        ci = r.get("ci")
        rows.append({
            "model": r["model"] + (" (served)" if r.get("served") else ""),
            "gate": ((hp.get("gates") or {}).get(r["model"]) or {}).get("status", "–"),
            "failure-zone images": r.get("images", 0),
            f"{ref} gt-mIoU": _pct(r.get("reference_gt_miou")),
            "gt-mIoU": _pct(r.get("gt_miou")),
            "gain (gt)": _signed(r.get("gain")),
            f"{conf:.0%} interval": f"{_signed(ci[0])} .. {_signed(ci[1])}" if ci else "–",
            "gain (standard mIoU)": _signed(r.get("gain_miou")),
            "gain on T(0) (gt)": _signed(r.get("t0_gain")),
            "training images left out": r.get("excluded_training_images", 0),
        })
    parts.append(_kv_table(rows))
    eff = hp.get("effort") or {}
    tot = eff.get("total") or {}
    if tot:
        if eff.get("simulated"):
            time_txt = "simulated raters and annotator (oracle): no human time was spent"
        else:
            secs = float(tot.get("lead_time_s") or 0.0)
            time_txt = f"{secs / 60:.1f} min of annotation time (Label Studio lead_time, summed)"
        effort = f"Human effort: {tot.get('ratings', 0)} ratings, {tot.get('masks', 0)} masks; {time_txt}."
        parts.append(f'<p class="headline">{_e(effort)}</p>')
        if eff.get("rounds"):
            parts.append(_kv_table(eff["rounds"]))
    zone = ", ".join(hp.get("failure_zone") or []) or "none"
    note = (f"Failure zone = the unbiased test sets drawn from the MAD candidates by the test-set rules "
            f"({zone}), pooled image by image; each model's own training images are left out of its "
            f"row. Gain = model minus {ref}, x 100; the interval is a paired bootstrap over images. "
            "The sets of later rounds were drawn against the model served then, which biases that model "
            "low there.")
    return _section("help", title, "".join(parts), note)


def _bar_chart(fl: Mapping[str, Any]) -> str | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    classes = list(fl["counts"])
    cols = list(fl["columns"])
    if not classes or not cols:
        return None
    fig = Figure(figsize=(9, max(2.2, 0.32 * len(classes) + 1.0)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(classes))
    h = 0.8 / len(cols)
    for j, c in enumerate(cols):
        ax.barh(y + j * h - 0.4 + h / 2, [fl["counts"][k].get(c, 0) for k in classes], height=h, label=c)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _fig_uri(fig)


def _fig_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _failures(ri: ReportInput) -> str:
    fl = ri.data.get("failures")
    title = "Failures per class"
    if not fl or not fl.get("counts"):
        return _section("failures", title, _missing("No candidates or ratings yet."))
    cols = list(fl["columns"])
    classes = [c for c in ri.classes if c in fl["counts"]] + [c for c in fl["counts"] if c not in ri.classes]
    pal = voc_palette(256)
    idx = {c: i for i, c in enumerate(ri.classes)}
    head = '<tr><th class="l">class</th>' + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    body = ""
    for cls in classes:
        sw = ""
        if cls in idx:
            r, g, b = (int(v) for v in pal[idx[cls]])
            sw = f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'
        body += (
            f'<tr><td class="l"><span class="legend" style="display:inline">{sw}</span>{_e(cls)}</td>'
            + "".join(f"<td>{_e(fl['counts'][cls].get(c, 0))}</td>" for c in cols)
            + "</tr>"
        )
    chart = _bar_chart({"columns": cols, "counts": {c: fl["counts"][c] for c in classes}})
    img = f'<img class="plot" alt="failures per class" src="{chart}">' if chart else ""
    note = fl.get("note") or "How many MAD candidates and low-rated images each class accounts for."
    return _section("failures", title, f"<table>{head}{body}</table>{img}", note)


def _baseline(ri: ReportInput) -> str:
    bl = ri.data.get("baseline")
    title = "MAD vs entropy selection (same labelling budget)"
    if not bl or not bl.get("rows"):
        return _section(
            "baseline", title, _missing("The entropy baseline has not been run (or not finished).")
        )
    cols = list(bl["columns"])
    best = {}
    for c in cols:
        vals = [r.get("values", {}).get(c) for r in bl["rows"]]
        vals = [float(v) for v in vals if isinstance(v, (int, float))]
        if vals:
            best[c] = max(vals)
    head = '<tr><th class="l">selection</th><th class="l">model</th>' + "".join(
        f"<th>{_e(c)}</th>" for c in cols
    )
    body = ""
    for r in bl["rows"]:
        cells = []
        for c in cols:
            v = r.get("values", {}).get(c)
            is_best = (
                isinstance(v, (int, float)) and c in best and float(v) == best[c] and len(bl["rows"]) > 1
            )
            cells.append(f"<td{' class=best' if is_best else ''}>{_pct(v) if _is_frac(v) else _e(v)}</td>")
        body += (
            f'<tr><td class="l">{_e(r.get("method", ""))}</td><td class="l">{_e(r.get("model", ""))}</td>'
            + "".join(cells)
            + "</tr>"
        )
    note = bl.get("note") or ""
    extra = []
    if bl.get("budget") is not None:
        extra.append(f"budget: {bl['budget']} labelled images per method")
    if bl.get("test_set"):
        extra.append(f"test set: {bl['test_set']}")
    note = "; ".join([*extra, note] if note else extra) + (
        ". mIoU x 100." if extra or note else "mIoU x 100."
    )
    return _section("baseline", title, f"<table>{head}</tr>{body}</table>", note)


def _is_frac(v: Any) -> bool:
    return v is None or (isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 1.0))


def _srcc_plot(curves: Mapping[str, Mapping[str, Any]]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, c in curves.items():
        ks = np.asarray(c["ks"], dtype=float)
        ys = np.asarray([np.nan if v is None else float(v) for v in c["srcc"]], dtype=float)
        n_models = len(c.get("models", []))
        ax.plot(ks, ys, marker="o", ms=3, lw=1.6, label=f"{name} ({n_models} models)" if n_models else name)
    ax.axhline(1.0, color="#999", lw=0.8, ls="--")
    ax.set_ylim(-1.05, 1.08)
    ax.set_xlabel("k (first k images of the test set)")
    ax.set_ylabel("SRCC vs ranking on all of T")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _fig_uri(fig)


def _srcc(ri: ReportInput) -> str:
    sr = ri.data.get("srcc") or {}
    title = "Ranking stability (SRCC)"
    curves = {k: v for k, v in sr.items() if v.get("ks")}
    if not curves:
        return _section("srcc", title, _missing("No test set with at least two evaluated models yet."))
    rows = []
    for name, c in curves.items():
        vals = [v for v in c["srcc"] if v is not None]
        ks = c["ks"]
        stable = None
        for k, v in zip(reversed(ks), reversed(c["srcc"]), strict=True):
            if v is None or v < 0.9:
                break
            stable = k
        rows.append(
            {
                "test set": name,
                "models": len(c.get("models", [])),
                "images": ks[-1],
                "SRCC at k=5": next((v for k, v in zip(ks, c["srcc"], strict=True) if k == 5), None),
                "min SRCC": min(vals) if vals else None,
                "stable (>= 0.9) from k": stable,
            }
        )
    fmt = [
        {k: (f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else v)) for k, v in r.items()}
        for r in rows
    ]
    body = f'<img class="plot" alt="SRCC curve" src="{_srcc_plot(curves)}">' + _kv_table(fmt)
    note = (
        "Spearman rank correlation between the models' ranking by mIoU on the first k images of a "
        "test set and their ranking on the whole set (ties: average ranks)."
    )
    return _section("srcc", title, body, note)


def _load_mask(ri: ReportInput, m: MaskLike) -> np.ndarray | None:
    if m is None:
        return None
    if isinstance(m, np.ndarray):
        return m
    if callable(m):
        return np.asarray(m())
    p = ri.path(m)
    with Image.open(p) as im:
        if im.mode not in ("P", "L"):
            raise MadsegError(f"{p}: mask mode {im.mode}; expected a mode-P/L PNG of class indices")
        return np.asarray(im)


def _read_photo(ri: ReportInput, p: Any, height: int) -> np.ndarray:
    from ml_backend.imageio import read_rgb

    rgb = read_rgb(ri.path(p))
    h, w = rgb.shape[:2]
    tw = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(rgb).resize((tw, height), Image.BILINEAR))


def _gallery(
    ri: ReportInput, key: str, items: Sequence[Mapping[str, Any]], max_items: int, thumb_height: int
) -> str:
    title, note = GALLERY_TITLES.get(key, (key.replace("_", " ").capitalize(), ""))
    if not items:
        empty = _missing("No images yet.")
        return f'<div class="gallery" id="gallery-{_e(key)}"><h3>{_e(title)}</h3>{empty}</div>'
    seen: set[int] = set()
    rows = []
    for it in items[:max_items]:
        try:
            photo = _read_photo(ri, it["image"], thumb_height)
        except MadsegError as exc:
            ri.warnings.append(f"gallery {key}: {exc}")
            continue
        figs = []
        panels = it.get("panels") or [{"title": "photo", "mask": None}]
        for p in panels:
            try:
                mask = _load_mask(ri, p.get("mask"))
            except (OSError, MadsegError, ValueError) as exc:
                ri.warnings.append(
                    f"gallery {key}, image {it.get('image_id') or it['image']}: mask {p.get('mask')}: {exc}"
                )
                figs.append(
                    f'<figure><div class="missing">missing mask</div><figcaption>{_e(p.get("title", ""))}'
                    "</figcaption></figure>"
                )
                continue
            if mask is not None:
                seen.update(int(v) for v in np.unique(mask))
            uri = png_base64(overlay(photo, mask))
            sub = f"<br><em>{_e(p['note'])}</em>" if p.get("note") else ""
            figs.append(
                f'<figure><img src="{uri}" height="{photo.shape[0]}" width="{photo.shape[1]}" '
                f'alt="{_e(p.get("title", ""))}">'
                f'<figcaption>{_e(p.get("title", ""))}{sub}</figcaption></figure>'
            )
        cap = it.get("caption") or it.get("image_id") or ""
        rows.append(f'<div class="item"><div class="cap">{_e(cap)}</div>{"".join(figs)}</div>')
    more = (
        f'<p class="note">Showing {min(len(items), max_items)} of {len(items)}.</p>'
        if len(items) > max_items
        else ""
    )
    n = f'<p class="note">{_e(note)}</p>' if note else ""
    return (
        f'<div class="gallery" id="gallery-{_e(key)}"><h3>{_e(title)}</h3>{n}{_legend(ri.classes, seen)}'
        f"{''.join(rows)}{more}</div>"
    )


def _legend(classes: Sequence[str], present: Collection[int]) -> str:
    pal = voc_palette(256)
    items = []
    for k in sorted(present):
        if k == 0:
            continue
        if k == IGNORE_INDEX:  # not coloured in the overlay look: the photo shows through
            items.append('<span><span class="sw" style="background:none;border:1px dashed #7b8496">'
                         '</span>ignore</span>')
            continue
        name = classes[k] if k < len(classes) else str(k)
        r, g, b = (int(v) for v in pal[k])
        items.append(f'<span><span class="sw" style="background:rgb({r},{g},{b})"></span>{_e(name)}</span>')
    if not items:
        return ""
    return '<div class="legend">' + "".join(items) + "</div>"


def _galleries(ri: ReportInput, max_items: int, thumb_height: int) -> str:
    ga = ri.data.get("galleries") or {}
    keys = list(GALLERY_TITLES) + [k for k in ga if k not in GALLERY_TITLES]
    body = "".join(_gallery(ri, k, ga.get(k) or [], max_items, thumb_height) for k in keys)
    note = "Predictions drawn over the photo in PASCAL VOC colours (legend per gallery)."
    return _section("galleries", "Galleries", body, note)


def _stages(ri: ReportInput) -> str:
    st = ri.data.get("stages") or []
    if not st:
        return _section("stages", "Wall time per stage", _missing("No stage timings recorded."))
    rows = [
        {
            "where": s.get("where", ""),
            "stage": s.get("stage", ""),
            "seconds": f"{float(s['seconds']):.1f}"
            if _is_num(s.get("seconds")) and s.get("seconds") is not None
            else "–",
        }
        for s in st
    ]
    total = sum(float(s["seconds"]) for s in st if isinstance(s.get("seconds"), (int, float)))
    return _section("stages", "Wall time per stage", _kv_table(rows), f"Total {total:.0f} s.")


def build_html(ri: ReportInput, *, max_gallery: int = 12, thumb_height: int = 160) -> str:
    """The whole page as one HTML string (images inline as base64 PNG; no external assets)."""
    d = ri.data
    gen = d.get("generated_at") or _dt.datetime.now().isoformat(timespec="seconds")
    sections = [
        _summary(ri),
        _table1(ri),
        _help(ri),
        _failures(ri),
        _baseline(ri),
        _srcc(ri),
        _galleries(ri, max_gallery, thumb_height),
        _stages(ri),
    ]
    warn = ""
    if ri.warnings:
        warn = _section(
            "warnings", "Warnings", "<ul>" + "".join(f"<li>{_e(w)}</li>" for w in ri.warnings) + "</ul>"
        )
    nav = "".join(f'<a href="#{s}">{s}</a>' for s in SECTION_IDS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>madseg report: {_e(d['experiment'])}</title>"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>madseg report: {_e(d['experiment'])}</h1>"
        f"<p>Maximum-discrepancy failure discovery and fine-tuning; generated {_e(gen)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(sections)}{warn}</main></body></html>\n"
    )


def _report_leaf(v: Any) -> Any:
    """What ``report.json`` holds for a value JSON cannot: an array's shape, an in-memory image."""
    if isinstance(v, np.ndarray):
        return f"<array {v.shape}>"
    if callable(v):
        return "<in-memory>"
    return v


def report_json(ri: ReportInput) -> dict[str, Any]:
    """The numbers of the page (galleries as paths and captions) as a JSON-serialisable dict."""
    out = jsonable(ri.data, default=_report_leaf)
    out.setdefault("classes", ri.classes)
    out["warnings"] = list(ri.warnings)
    return out


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    json: Path


def render_report(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    max_gallery: int = 12,
    thumb_height: int = 160,
) -> ReportFiles:
    """Validate ``results`` and write ``out_dir/report.html`` and ``out_dir/report.json`` atomically.

    ``base_dir``: where relative image/mask paths start (default ``out_dir``). A missing image or
    mask does not stop the report: it is listed in a Warnings section (and in the JSON).
    """
    out_dir = Path(out_dir)
    ri = validate_results(results, base_dir if base_dir is not None else out_dir)
    page = build_html(ri, max_gallery=max_gallery, thumb_height=thumb_height)
    html_path = atomic_write_text(out_dir / REPORT_HTML, page)
    json_path = atomic_write_json(out_dir / REPORT_JSON, report_json(ri))
    for w in ri.warnings:
        log.warning("report: %s", w)
    return ReportFiles(html_path, json_path)


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json``; :class:`MadsegError` naming the file if it is missing or broken."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MadsegError(
            f"{path}: no results yet; run `madseg round` (or the demo) for this experiment first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MadsegError(f"{path}: unreadable results ({exc}); re-run the evaluation") from None
    validate_results(data, path.parent, source=str(path))
    return data


def stage_times(exp_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Wall time of every finished stage from the round state files under ``exp_dir`` (also in
    sub-experiments such as ``baseline-entropy/``): ``[{"where", "stage", "seconds"}]``."""
    exp_dir = Path(exp_dir)
    out = []

    def order(p: Path) -> tuple[str, int]:
        num = round_number(p)
        return (str(p.parent.parent), -1 if num is None else num)

    for st_file in sorted(exp_dir.glob(f"**/{ROUND_PREFIX}*/{STATE_FILE}"), key=order):
        try:
            data = json.loads(st_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        where = str(st_file.parent.relative_to(exp_dir))
        for name, rec in (data.get("stages") or {}).items():
            if isinstance(rec, Mapping) and rec.get("status") == "done":
                out.append({"where": where, "stage": name, "seconds": rec.get("seconds")})
    return out

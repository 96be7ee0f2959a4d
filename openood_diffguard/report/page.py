"""``Run`` -> one self-contained HTML page: every image inlined as a data URI, no scripts, no external
CSS, fonts or links, so it opens from disk, offline, and can be mailed or attached to a paper review."""
from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from .gallery import Gallery, png_bytes
from .runs import Method, Run, Table, load_run

#: (column, OODMetrics field, higher is better)
METRIC_COLUMNS = (
    ("FPR@95 (OOD+, OpenOOD v1.5)", "fpr95_ood_positive", False),
    ("FPR@95 (ID+, papers)", "fpr95_id_positive", False),
    ("AUROC", "auroc", True),
    ("AUPR-In", "aupr_in", True),
    ("AUPR-Out", "aupr_out", True),
    ("ACC", "acc", True),
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;
background:#fafafa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:1.55em;margin:0.6em 0 0.1em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;
padding-bottom:4px}h3{font-size:1.02em;margin:1.2em 0 0.4em}
.sub{color:#555;font-size:0.9em}nav a{margin-right:14px;font-size:0.9em}
table{border-collapse:collapse;font-size:0.86em;background:#fff;margin:8px 0}
th,td{border:1px solid #d6d6d6;padding:4px 8px;text-align:right}th{background:#f0f0f3}
td:first-child,th:first-child,td.name{text-align:left}td.name{white-space:nowrap}tr.group td{background:#f7f7fa;font-style:italic}
td.best{font-weight:700}.note{font-size:0.85em;color:#444}.ok{color:#1a7f37}.warn{color:#9a6700}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #e3e3e3;background:#fff}
figcaption{font-size:0.82em;color:#555}
.row{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:6px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:0.75em;width:max-content}
.card.mistake{border-color:#d1242f;box-shadow:inset 0 0 0 1px #d1242f}
.pics{display:flex;gap:4px}.pic{text-align:center;color:#666;font-size:0.9em}
.pic img{width:84px;height:84px;object-fit:contain;image-rendering:pixelated;display:block;background:#000}
.tag{display:inline-block;padding:0 5px;border-radius:3px;font-size:0.9em}
.tag.bad{background:#ffebe9;color:#a40e26}.tag.good{background:#dafbe1;color:#116329}
.key{color:#777;max-width:270px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
pre{background:#fff;border:1px solid #ddd;padding:10px;font-size:0.78em;overflow:auto;max-height:520px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "") -> str:
    return f'<img src="{_data_uri(png)}" alt="{_e(alt)}"{f" class={cls!r}" if cls else ""}>'


def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * float(v):.2f}"


# ---------------------------------------------------------------------------------------- metrics
def metrics_table(run: Run) -> str:
    head = ["method", "OOD set", *(c for c, _, _ in METRIC_COLUMNS)]
    body: list[str] = []
    per_set: dict[str, list[tuple[str, Any]]] = {}
    rows = []
    for m in run.methods.values():
        for ds, met in m.metrics().items():
            rows.append((m, ds, met))
            per_set.setdefault(ds, []).append((m.name, met))
    best = {}
    for ds, entries in per_set.items():  # best method per OOD set and column (only when methods compete)
        if len(entries) > 1:
            for _, f, higher in METRIC_COLUMNS:
                vals = [getattr(met, f) for _, met in entries]
                if all(np.isfinite(vals)):
                    target = max(vals) if higher else min(vals)
                    best[(ds, f)] = {n for n, met in entries if getattr(met, f) == target}
    for m, ds, met in rows:
        cls = ' class="group"' if ds in m.groups else ""
        cells = [f'<td class="name">{_e(m.name)}</td>', f'<td class="name">{_e(run.split_name(ds))}</td>']
        for _, f, _ in METRIC_COLUMNS:
            b = " class=best" if m.name in best.get((ds, f), ()) else ""
            cells.append(f"<td{b}>{_pct(getattr(met, f))}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    if not body:
        return ""
    return ('<table id="metrics"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def extra_table(t: Table) -> str:
    pct_cols = {i for i, c in enumerate(t.columns) if c not in ("dataset", "score")}
    rows = "".join("<tr>" + "".join(f"<td{' class=name' if i not in pct_cols else ''}>"
                                    f"{_pct(v) if i in pct_cols else _e(v)}</td>" for i, v in enumerate(r)) + "</tr>"
                   for r in t.rows)
    note = f'<p class="note">{_e(t.note)}</p>' if t.note else ""
    return (f"<h3>{_e(t.title)}</h3><table class=extra><thead><tr>"
            + "".join(f"<th>{_e(c)}</th>" for c in t.columns) + f"</tr></thead><tbody>{rows}</tbody></table>{note}")


# ---------------------------------------------------------------------------------------- figures
def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def _plots():
    try:
        from . import plots
    except ModuleNotFoundError as err:  # matplotlib is an optional extra of a slim install
        raise ModuleNotFoundError(f"openood-diffguard report draws its figures with matplotlib ({err}); install it: "
                                  "pip install matplotlib") from err
    return plots


def curve_figures(run: Run) -> list[tuple[bytes, str]]:
    """One figure for all methods when each has one OOD set (the demo), else one figure per method."""
    plots = _plots()
    methods = [m for m in run.methods.values() if m.ood and np.isfinite(m.id_split.conf).all()]
    if not methods:
        return []
    if all(len(m.ood) == 1 for m in methods):
        ood = run.split_name(next(iter(methods[0].ood)))
        series = [(f"{m.name} (AUROC {100 * next(iter(m.metrics().values())).auroc:.1f})", m.id_split.conf,
                   next(iter(m.ood.values())).conf) for m in methods if m.metrics()]
        return [(plots.curves(series, f"all methods: ID test vs {ood}"), "ROC and PR curves of every method")]
    out = []
    for m in methods:
        met = m.metrics()
        series = [(f"{run.split_name(ds)} (AUROC {100 * met[ds].auroc:.1f})", m.id_split.conf, s.conf)
                  for ds, s in m.ood.items() if ds in met]
        if series:
            out.append((plots.curves(series, f"{m.name}: ID test vs each OOD set"), f"ROC and PR curves of {m.name}"))
    return out


def histogram_figure(run: Run) -> bytes | None:
    panels = []
    for m in run.methods.values():
        thr = m.threshold()
        for ds, s in m.ood.items():
            title = m.name if len(m.ood) == 1 else f"{m.name}: {run.split_name(ds)}"
            id_name = ", ".join(run.split_name(n) for n in m.id)
            panels.append((title, _finite(m.id_split.conf), _finite(s.conf), id_name, run.split_name(ds), thr))
    return _plots().histograms(panels) if panels else None


# ---------------------------------------------------------------------------------------- galleries
def _entries(galleries: Iterable[Gallery], role: str, order: str) -> list[tuple[Gallery, int]]:
    """(gallery, row) of one role pooled over splits: by confidence, or round-robin in drawing order."""
    items = [(g, int(r)) for g in galleries for r in g.picked(role)]
    if order == "high":
        items.sort(key=lambda gr: -gr[0].conf[gr[1]])
    elif order == "low":
        items.sort(key=lambda gr: gr[0].conf[gr[1]])
    else:
        items.sort(key=lambda gr: gr[0].rank[role][gr[1]])
    return items


#: statistics that say how a score was made rather than what it is (listed last on a card)
_BOOKKEEPING = ("guide_label", "stop_index")


def _card(run: Run, g: Gallery, row: int, thr: float) -> str:
    kinds = list(g.images)
    pics = "".join(f'<div class="pic">{_img(png_bytes(g.images[k][row]), f"{k} of {g.keys[row]}")}{_e(k)}</div>'
                   for k in kinds)
    label, pred, conf = int(g.labels[row]), int(g.preds[row]), float(g.conf[row])
    truth = f"OOD ({run.split_name(g.split)})" if g.role == "ood" else run.class_name(label)
    called_id = conf >= thr
    wrong = called_id if g.role == "ood" else not called_id
    verdict = (f'<span class="tag bad">{"accepted as ID" if g.role == "ood" else "flagged OOD"}</span>' if wrong
               else f'<span class="tag good">{"flagged OOD" if g.role == "ood" else "accepted as ID"}</span>')
    shown = sorted(g.stats, key=lambda k: (k in _BOOKKEEPING, k))  # the similarities / distances first
    stats = ", ".join(f"{k} {float(g.stats[k][row]):.4g}" for k in shown[:4])
    return (f'<div class="card{" mistake" if wrong else ""}"><div class="pics">{pics}</div>'
            f"<div>true: <b>{_e(truth)}</b> &middot; predicted: <b>{_e(run.class_name(pred))}</b></div>"
            f"<div>score {conf:.4g} {verdict}</div>"
            + (f'<div class="key" title="{_e(stats)}">{_e(stats)}</div>' if stats else "")
            + f'<div class="key" title="{_e(g.keys[row])}">{_e(str(g.keys[row]).split("::", 1)[-1])}</div></div>')


def gallery_section(run: Run, m: Method) -> str:
    ids = [m.galleries[s] for s in m.id if s in m.galleries]
    oods = [m.galleries[s] for s in m.ood if s in m.galleries]
    if not ids and not oods:
        return ""
    thr = m.threshold()
    k = max(int(g.meta.get("k", 6)) for g in ids + oods)
    kinds: dict[str, str] = {}
    for g in ids + oods:
        kinds.update(g.meta.get("image_kinds", {}))
    rows = [
        ("OOD scored as ID: the most confident mistakes", _entries(oods, "high", "high")[:k],
         "the OOD samples with the highest confidence (pooled over the OOD sets)"),
        ("ID scored as OOD: the most confident mistakes", _entries(ids, "low", "low")[:k],
         "the ID test samples with the lowest confidence"),
        ("typical correct ID cases", [(g, r) for g, r in _entries(ids, "sample", "rank") if g.conf[r] >= thr][:k],
         "a seeded random draw of ID test samples, those accepted as ID"),
        ("typical correct OOD cases", [(g, r) for g, r in _entries(oods, "sample", "rank") if g.conf[r] < thr][:k],
         "a seeded random draw of OOD samples, those flagged OOD"),
    ]
    parts = [f'<h3 id="gallery-{_e(m.name)}">{_e(m.name)}</h3>',
             f'<p class="note">Threshold {thr:.4g}: 95 % of the ID test samples score at least this much (the '
             "papers' FPR@95 operating point); red frames are mistakes at this threshold. Pictures: "
             + "; ".join(f"<b>{_e(k_)}</b>: {_e(v)}" for k_, v in kinds.items()) + ".</p>"]
    for title, entries, what in rows:
        cards = "".join(_card(run, g, r, thr) for g, r in entries) or '<p class="note">none</p>'
        parts.append(f'<h4>{_e(title)}</h4><p class="note">{_e(what)}.</p><div class="row">{cards}</div>')
    recomputed = sum(int(g.meta.get("recomputed", 0)) for g in ids + oods)
    parts.append(f'<p class="note">Chosen after scoring: {k} per kind and split ({sum(len(g) for g in ids + oods)} '
                 f"samples stored with the run); {recomputed} of them were run through the detector again for their "
                 "pictures (not captured while scoring).</p>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------- page
def _timings(run: Run) -> str:
    if not run.timings:
        return '<p class="note">no timings recorded by this run</p>'
    rows = "".join(f'<tr><td class="name">{_e(k)}</td><td>{v:.1f}</td></tr>' for k, v in run.timings.items())
    return f'<table id="timings"><thead><tr><th>stage</th><th>seconds</th></tr></thead><tbody>{rows}</tbody></table>'


def render(run: Run, generated: str | None = None) -> str:
    from .. import __version__

    generated = generated or _dt.date.today().isoformat()
    sections: list[tuple[str, str, str]] = []
    acc = (f"<p>Classifier accuracy on {_e(run.accuracy_scope)}: <b>{100 * run.classifier_accuracy:.2f} %</b>.</p>"
           if run.classifier_accuracy is not None else "")
    explain = ("<p class=note>All values in %. <b>FPR@95 (OOD+, OpenOOD v1.5)</b>: share of ID samples flagged OOD "
               "when 95 % of the OOD samples are caught (OOD = positive, OpenOOD v1.5's column). <b>FPR@95 (ID+, "
               "papers)</b>: share of OOD samples accepted as ID when 95 % of the ID samples are accepted (the "
               "DiffGuard / DiffNB / DLSR papers and OpenOOD before August 2023). AUROC is the same either way; "
               "AUPR-In takes ID as positive, AUPR-Out OOD. ACC: accuracy of the predicted labels on the ID test "
               "set. Group rows (nearood, farood) are unweighted means, as in OpenOOD. Bold: best per OOD set.</p>")
    checks = "".join(f'<li class="ok">{_e(c)}</li>' for c in run.checks)
    tables = metrics_table(run) + "".join(extra_table(t) for t in run.tables)
    sections.append(("metrics", "Metrics", acc + explain + tables + (f"<ul>{checks}</ul>" if checks else "")))
    figs = curve_figures(run)
    if figs:
        sections.append(("curves", "ROC and precision-recall curves",
                         "".join(f"<figure>{_img(png, cap)}<figcaption>{_e(cap)}: OOD is the positive class in "
                                 "the ROC panels (x: ID flagged OOD, y: OOD caught); the log-axis panel shows the "
                                 "low false-positive end.</figcaption></figure>" for png, cap in figs)))
    hist = histogram_figure(run)
    if hist is not None:
        sections.append(("histograms", "Score distributions",
                         f"<figure>{_img(hist, 'score histograms')}<figcaption>Confidence of ID and OOD test "
                         "samples per method (densities); dashed: the threshold that accepts 95 % of ID."
                         "</figcaption></figure>"))
    gal = "".join(gallery_section(run, m) for m in run.methods.values())
    if gal:
        sections.append(("galleries", "Why samples were flagged: galleries", gal))
    cfg = yaml.safe_dump(_plain(run.config), sort_keys=False, default_flow_style=False, width=110) if run.config else ""
    sections.append(("config", "Configuration and timings",
                     _timings(run) + (f"<pre>{_e(cfg)}</pre>" if cfg else '<p class="note">no configuration found</p>')))
    if run.notes:
        sections.append(("notes", "Not shown, and why", "<ul>" + "".join(f'<li class="warn">{_e(n)}</li>'
                                                                         for n in run.notes) + "</ul>"))
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            # no network, no scripts: inline images and styles only
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{_e(run.title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_e(run.title)}</h1><p class=sub>{_e(run.kind)} run &middot; folder {_e(run.folder.name)} "
            f"&middot; report written {_e(generated)} by openood-diffguard {_e(__version__)}</p><nav>{nav}</nav>"
            f"{body}</main></body></html>")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_report(run_dir: str | Path, out: str | Path | None = None, generated: str | None = None,
                 trust_pickle: bool = False) -> Path:
    """Read a run folder (``runs.load_run``) and write its self-contained HTML report (default:
    ``<run_dir>/report.html``). Returns the path written."""
    run = load_run(run_dir, trust_pickle)
    path = Path(out) if out is not None else (run.folder if Path(run_dir).is_dir() else Path(run_dir).parent) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(render(run, generated), encoding="utf-8")
    tmp.replace(path)
    return path


__all__: Sequence[str] = ("render", "write_report", "metrics_table")

"""A one-page report of a scan: what the guard thinks is happening, at a glance.

``build_report(verdicts, bundle)`` reads a verdict file (JSONL or CSV) in one streaming pass and gathers the flag
rate, the target-class alarm, per-detector score distributions and the most suspicious flagged inputs;
``write_html`` renders a self-contained HTML page (figures inlined as base64 PNGs), ``write_png`` one PNG.

Thumbnails are re-read from each record's ``source`` (an image path, ``ARRAY#ROW`` or ``JSONL:LINE``) rather than
embedded in the verdicts, which keeps verdict files small; an input that cannot be re-read (stdin, a moved file)
shows as an empty tile. With the bundle (``--bundle``) the histograms show the clean calibration distribution
beside the scanned one, and the alarm is recomputed against the bundle's clean null distribution.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .scan import ScanSummary, read_records
from .sources import read_source

log = logging.getLogger(__name__)

THUMB = 64


@dataclass
class ReportData:
    source: str
    summary: ScanSummary
    class_names: list[str]
    detector_scores: dict[str, list[float]] = field(default_factory=dict)
    detector_flagged: dict[str, list[float]] = field(default_factory=dict)
    combined: list[float] = field(default_factory=list)  # -log10 combined p of scanned, not flagged inputs
    combined_flagged: list[float] = field(default_factory=list)
    top_flagged: list[dict[str, Any]] = field(default_factory=list)
    calibration_scores: dict[str, np.ndarray] | None = None
    calibration_combined: np.ndarray | None = None
    thresholds: list[float] = field(default_factory=list)  # -log10 p-thresholds (one, or one per class)
    null_probs: list[float] | None = None  # the alarm's Dirichlet concentrations
    bundle: str | None = None


def _calibration(bundle: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    from .bundle import bundle_file, load_arrays, open_bundle
    from .runtime import calibrator_from_manifest, file_key

    with open_bundle(bundle) as (root, manifest):  # the calibration file must be a hashed member inside the bundle
        arrays = load_arrays(bundle_file(root, manifest, manifest["calibration"]["file"]))
    cal = calibrator_from_manifest(manifest, arrays)
    scores = {e["name"]: arrays[f"scores__{file_key(e['name'])}"] for e in manifest["detectors"]}
    loo, _, _ = cal.pvalues(cal.scores, cal.pred, leave_one_out=True)
    return manifest, scores, -np.log10(np.maximum(loo, 1e-300))


def build_report(verdicts: str | os.PathLike, bundle: str | os.PathLike | None = None, max_thumbnails: int = 48,
                 alarm_alpha: float = 1e-3) -> ReportData:
    """One pass over the verdict file; memory holds the scores (8 bytes per input and detector) and the
    ``max_thumbnails`` most suspicious flagged records."""
    summary = ScanSummary(output=str(verdicts))
    det_scores: dict[str, list[float]] = {}
    det_flagged: dict[str, list[float]] = {}
    combined: list[float] = []
    combined_flagged: list[float] = []
    heap: list[tuple[float, int, dict[str, Any]]] = []
    names: dict[int, str] = {}
    for i, rec in enumerate(read_records(verdicts)):
        summary.add(rec)
        if rec.get("error"):
            continue
        names.setdefault(int(rec["label"]), str(rec.get("class_name", rec["label"])))
        score = float(rec.get("score") or 0.0)
        flagged = rec.get("flagged") is True
        (combined_flagged if flagged else combined).append(score)
        for d, v in (rec.get("detectors") or {}).items():
            if v.get("score") is not None and np.isfinite(float(v["score"])):
                (det_flagged if flagged else det_scores).setdefault(d, []).append(float(v["score"]))
                det_scores.setdefault(d, [])
        if flagged:
            item = (score, -i, {k: rec.get(k) for k in ("id", "source", "label", "class_name", "score", "kind")})
            if len(heap) < max_thumbnails:
                heapq.heappush(heap, item)
            else:
                heapq.heappushpop(heap, item)
    data = ReportData(str(verdicts), summary, [], det_scores, det_flagged, combined, combined_flagged,
                      [r for _, _, r in sorted(heap, reverse=True)])
    if bundle is not None:
        manifest, cal_scores, cal_combined = _calibration(bundle)
        data.bundle = str(bundle)
        data.class_names = list(manifest["class_names"])
        data.calibration_scores, data.calibration_combined = cal_scores, cal_combined
        c = manifest["calibration"]
        thr = c["class_thresholds"] if c.get("mondrian") else [c["p_threshold"]]
        data.thresholds = sorted({float(-np.log10(t)) for t in thr if t > 0})
        data.null_probs = c.get("alarm_null", {}).get("dirichlet")
    else:
        k = max(names) + 1 if names else 0
        data.class_names = [names.get(i, str(i)) for i in range(k)]
    summary.finish(data.class_names, manifest["calibration"] if bundle is not None else None, alarm_alpha)
    return data


# ------------------------------------------------------------------------------------------------ drawing


def _hist(ax: Any, scanned: Sequence[float] | np.ndarray, flagged: Sequence[float] | np.ndarray,
          cal: np.ndarray | None, title: str, xlabel: str, thresholds: Sequence[float] = ()) -> None:
    """Shares of inputs per bin: clean calibration (grey), scanned not flagged (blue) and flagged (red; the two
    scanned series are shares of *all* scanned inputs, so they add up to the scan's distribution). Heavy-tailed
    positive scores get logarithmic bins."""
    scanned, flagged = np.asarray(scanned, float), np.asarray(flagged, float)
    cal = np.asarray(cal, float) if cal is not None else np.zeros(0)
    allv = np.concatenate([scanned, flagged, cal])
    allv = allv[np.isfinite(allv)]
    ax.set_title(title, fontsize=9)
    if allv.size == 0:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        return
    lo, hi = float(allv.min()), float(allv.max())
    hi = max(hi, max(thresholds, default=hi))
    log_x = lo > 0 and hi / lo > 30
    if log_x:
        bins = np.geomspace(lo, hi * 1.0001, 41)
        ax.set_xscale("log")
    else:
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    n_scan = max(len(scanned) + len(flagged), 1)
    if len(cal):
        ax.hist(cal, bins=bins, weights=np.full(len(cal), 1 / len(cal)), alpha=0.35, color="tab:gray",
                label=f"clean calibration (n={len(cal)})")
    if len(scanned):
        ax.hist(scanned, bins=bins, weights=np.full(len(scanned), 1 / n_scan), histtype="step", color="tab:blue",
                lw=1.5, label=f"scanned, not flagged (n={len(scanned)})")
    if len(flagged):
        ax.hist(flagged, bins=bins, weights=np.full(len(flagged), 1 / n_scan), color="tab:red", alpha=0.8,
                label=f"scanned, flagged (n={len(flagged)})")
    for t in thresholds:
        ax.axvline(t, color="k", ls="--", lw=0.8)
    ax.set_xlabel(xlabel + (" (log scale)" if log_x else ""), fontsize=8)
    ax.set_ylabel("share of inputs", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper right")


def _classes(ax: Any, data: ReportData) -> None:
    s = data.summary
    k = len(data.class_names)
    counts = np.array([s._flag_counts.get(c, 0) for c in range(k)])
    x = np.arange(k)
    colors = ["tab:red" if s.alarm and s.alarm.fired and c == s.alarm.target else "tab:blue" for c in range(k)]
    ax.bar(x, counts, color=colors, label="flagged")
    if data.null_probs is not None and counts.sum():
        share = np.asarray(data.null_probs) / np.sum(data.null_probs)
        ax.plot(x, counts.sum() * share, "k_", ms=14, mew=2, label="expected if clean")
    ax.set_xticks(x, [n[:10] for n in data.class_names], rotation=45, ha="right", fontsize=7)
    ax.set_title("flagged inputs by predicted class", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)


def _thumbnails(records: Sequence[Mapping[str, Any]], cols: int = 12) -> np.ndarray | None:
    from PIL import Image

    if not records:
        return None
    rows = (len(records) + cols - 1) // cols
    pad = 2
    grid = np.full((rows * (THUMB + pad) + pad, cols * (THUMB + pad) + pad, 3), 255, np.uint8)
    for i, rec in enumerate(records):
        img = read_source(str(rec.get("source") or rec.get("id")))
        r, c = divmod(i, cols)
        y, x = pad + r * (THUMB + pad), pad + c * (THUMB + pad)
        if img is None:
            grid[y : y + THUMB, x : x + THUMB] = 220
            continue
        rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
        pil = Image.fromarray(rgb)
        pil.thumbnail((THUMB, THUMB), Image.Resampling.NEAREST if max(pil.size) < THUMB else Image.Resampling.BILINEAR)
        if max(pil.size) < THUMB:
            scale = THUMB // max(pil.size)
            pil = pil.resize((pil.size[0] * scale, pil.size[1] * scale), Image.Resampling.NEAREST)
        a = np.asarray(pil)
        grid[y : y + a.shape[0], x : x + a.shape[1]] = a
    return grid


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figures(data: ReportData) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, str] = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    _hist(axes[0], data.combined, data.combined_flagged, data.calibration_combined,
          "guard score -log10(combined p)" + (f"; dashed: threshold{'s' if len(data.thresholds) > 1 else ''}"
                                              if data.thresholds else ""), "-log10 p", data.thresholds)
    _classes(axes[1], data)
    figs["overview"] = _png(fig)
    dets = sorted(set(data.detector_scores) | set(data.detector_flagged))
    if dets:
        cols = min(3, len(dets))
        rows = (len(dets) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax, d in zip(axes.flat, dets):
            cal = data.calibration_scores.get(d) if data.calibration_scores else None
            _hist(ax, data.detector_scores.get(d, []), data.detector_flagged.get(d, []), cal, d,
                  "raw score (higher = more suspicious)")
        for ax in list(axes.flat)[len(dets):]:
            ax.axis("off")
        fig.tight_layout()
        figs["detectors"] = _png(fig)
    grid = _thumbnails(data.top_flagged)
    if grid is not None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        figs["thumbnails"] = base64.b64encode(buf.getvalue()).decode()
    return figs


# ------------------------------------------------------------------------------------------------ output


def write_html(data: ReportData, path: str | os.PathLike) -> Path:
    """A self-contained HTML page (no external files, figures as inline base64 PNGs)."""
    s = data.summary
    j = s.to_json()
    figs = _figures(data)
    e = html.escape
    alarm = s.alarm
    if alarm is None:
        banner = ('<div class="note">Target-class alarm not computed: pass <code>--bundle</code> (the clean '
                  'calibration distribution is its null hypothesis).</div>')
    elif alarm.fired:
        banner = f'<div class="alarm">ALARM — {e(alarm.message())}</div>'
    else:
        banner = f'<div class="ok">{e(alarm.message())}</div>'
    rows = [("inputs", s.total), ("scored", s.scanned), ("flagged", f"{s.flagged} ({s.flag_rate:.2%}; 95% CI "
                                                                      f"{j['flag_rate_ci95'][0]:.2%}–"
                                                                      f"{j['flag_rate_ci95'][1]:.2%})"),
            ("errors", s.errors), ("resized / converted", s.resized)]
    if data.thresholds:
        rows.append(("calibrated p-threshold" + ("s (Mondrian)" if len(data.thresholds) > 1 else ""),
                     ", ".join(f"{10 ** -t:.3g}" for t in data.thresholds)))
    table = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows)

    def kv(d: Mapping[str, int]) -> str:
        return ", ".join(f"{e(str(k))}: {v}" for k, v in d.items()) or "none"

    thumbs = ""
    if "thumbnails" in figs:
        caption = "; ".join(f"{i + 1}. {e(str(r.get('id')))} → {e(str(r.get('class_name')))} "
                            f"(score {float(r.get('score') or 0):.2f}"
                            f"{', ' + e(str(r['kind'])) if r.get('kind') else ''})"
                            for i, r in enumerate(data.top_flagged))
        thumbs = (f"<h2>Most suspicious flagged inputs ({len(data.top_flagged)} of {s.flagged})</h2>"
                  f'<img alt="flagged thumbnails" src="data:image/png;base64,{figs["thumbnails"]}">'
                  f'<details><summary>ids (left to right, top to bottom)</summary><p class="small">{caption}</p>'
                  f"</details>")
    elif s.flagged == 0:
        thumbs = "<h2>Flagged inputs</h2><p>None.</p>"
    det = (f'<h2>Per-detector scores</h2><img alt="detector histograms" '
           f'src="data:image/png;base64,{figs["detectors"]}">') if "detectors" in figs else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>abl-guard report: {e(Path(data.source).name)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}} th,td{{text-align:left;padding:3px 12px;border-bottom:1px solid #ddd}}
.alarm{{background:#c62828;color:#fff;padding:12px;font-size:1.2em;font-weight:bold;border-radius:4px}}
.ok{{background:#e8f5e9;padding:10px;border-radius:4px}} .note{{background:#fff8e1;padding:10px;border-radius:4px}}
img{{max-width:100%}} .small{{font-size:0.8em;color:#555}} code{{background:#f3f3f3}}
</style></head><body>
<h1>abl-guard scan report</h1>
<p class="small">verdicts: <code>{e(data.source)}</code>{f" · bundle: <code>{e(data.bundle)}</code>" if data.bundle
                                                          else ""}</p>
{banner}
<h2>Summary</h2><table>{table}</table>
<p>Flagged by kind: {kv(s.kinds)}<br>Errors by reason: {kv(s.error_reasons)}</p>
<h2>Scores and classes</h2>
<img alt="overview" src="data:image/png;base64,{figs['overview']}">
<p class="small">Left: the guard's combined score of scanned inputs against clean calibration inputs (leave-one-out);
inputs right of the dashed line are flagged. Right: flagged inputs per predicted class against what clean data would
give (a backdoor sends its inputs to one target class).</p>
{det}
{thumbs}
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def write_png(data: ReportData, path: str | os.PathLike) -> Path:
    """The same content as one PNG image (for chat, tickets, CI artefacts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data.summary
    dets = sorted(set(data.detector_scores) | set(data.detector_flagged))
    grid = _thumbnails(data.top_flagged)
    ncols = max(2, min(3, len(dets)))
    det_rows = (len(dets) + ncols - 1) // ncols
    heights = [0.6, 2.6] + [2.4] * det_rows + ([2.8] if grid is not None else [])
    fig = plt.figure(figsize=(4 * ncols, sum(heights) + 0.5))
    gs = fig.add_gridspec(len(heights), ncols, height_ratios=heights)
    ax = fig.add_subplot(gs[0, :])
    ax.axis("off")
    head = (f"{s.total} inputs · {s.flagged} flagged ({s.flag_rate:.2%} of {s.scanned}) · {s.errors} errors"
            + (f" · {s.resized} resized" if s.resized else ""))
    alarm = s.alarm.message() if s.alarm else "alarm not computed (no --bundle)"
    ax.text(0, 0.75, head, fontsize=11, transform=ax.transAxes)
    ax.text(0, 0.1, ("ALARM: " if s.alarm and s.alarm.fired else "") + alarm, fontsize=9, transform=ax.transAxes,
            color="#c62828" if s.alarm and s.alarm.fired else "#2e7d32", wrap=True)
    _hist(fig.add_subplot(gs[1, : ncols - 1]), data.combined, data.combined_flagged, data.calibration_combined,
          "guard score -log10(combined p)", "-log10 p", data.thresholds)
    _classes(fig.add_subplot(gs[1, ncols - 1]), data)
    for i, d in enumerate(dets):
        cal = data.calibration_scores.get(d) if data.calibration_scores else None
        _hist(fig.add_subplot(gs[2 + i // ncols, i % ncols]), data.detector_scores.get(d, []),
              data.detector_flagged.get(d, []), cal, d, "raw score")
    if grid is not None:
        ax = fig.add_subplot(gs[-1, :])
        ax.imshow(grid)
        ax.axis("off")
        ax.set_title(f"most suspicious flagged inputs ({len(data.top_flagged)} of {s.flagged})", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return out

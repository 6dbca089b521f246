"""One table of every retrain-mode ABL run in several ``bench/abl.py`` results files (no training: reads the JSONs).

Each ABL run is listed with the no-defence run of the same attack, seed and file (and, from any file given, the ASR
of a clean-data model under the same trigger, ``bench/abl.py --clean-only``): CA / ASR without defence and with
ABL, what the isolation and the seed expansion did, the verdict of the current rule on the stored report, the residual
attack success through the guard, and ABL's time over its own clean stage. Runs recorded before ``--expansion-method``
existed used the classifier expansion.

    python bench/abl_table.py bench/results/abl_retrain_r10.json ... --out bench/results/abl_retrain_summary
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from _common import write_markdown_keeping_notes

_spec = importlib.util.spec_from_file_location("bench_abl", Path(__file__).resolve().parent / "abl.py")
assert _spec is not None and _spec.loader is not None
_bench_abl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_abl)
verdict_cell = _bench_abl.verdict_cell
time_ratio = _bench_abl.time_ratio
time_ratio_per_epoch = _bench_abl.time_ratio_per_epoch
from abl_guard.abl.report import found_by_input_scan, found_by_off_label_scan, found_by_scan  # noqa: E402  (bench/abl.py put the repository on sys.path)


def rows_of(path: Path) -> list[dict[str, Any]]:
    """``{file, attack, rate, seed, none, abl}`` per retrain-mode ABL run of one results file."""
    runs = json.loads(path.read_text())["runs"]
    out = []
    for r in runs:
        if r["kind"] != "abl" or r.get("expansion") is None:
            continue
        none = next((n for n in runs if n["kind"] == "none" and n["attack"] == r["attack"] and n["seed"] == r["seed"]),
                    None)
        out.append({"file": path.stem, "attack": r["attack"], "rate": r["settings"]["rate"], "seed": r["seed"],
                    "method": method_of(r), "none": none, "abl": r})
    return out


def method_of(r: dict[str, Any]) -> str:
    """The expansion that decided what was removed: the settings' method, or the label scan (with its method; runs
    recorded before the contrastive scan existed used the spectral one) when it took over."""
    method = r["settings"].get("expansion_method", "classifier")
    if not found_by_scan(r["expansion"]):
        return method
    if found_by_input_scan(r["expansion"]):
        return f"{method} → input label scan"
    if found_by_off_label_scan(r["expansion"]):
        return f"{method} → off-label scan"
    return f"{method} → {r['expansion'].get('scan_method', 'spectral')} label scan"


def floors_of(paths: list[Path]) -> dict[tuple[str, int], float]:
    """``(attack, seed) -> ASR`` of the clean-data models (``bench/abl.py --clean-only``) in any of the files."""
    out = {}
    for path in paths:
        for r in json.loads(path.read_text())["runs"]:
            if r["kind"] == "clean" and isinstance(r.get("attack_success_rate"), dict):
                out.update({(a, r["seed"]): v for a, v in r["attack_success_rate"].items()})
    return out


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def line(x: dict[str, Any], floors: dict[tuple[str, int], float]) -> str:
    r, n = x["abl"], x["none"] or {}
    e = r["expansion"]
    e2e_none, e2e_abl = n.get("end_to_end", {}), r.get("end_to_end", {})
    capped = ", capped" if e.get("capped") else ""
    if r["settings"].get("retrain_epochs", "full") != "full":
        capped += f", retrain {r['history_stages'].count('clean')} epochs"
    sep = r["settings"].get("expansion_scan_separation")
    if sep is not None and sep != 5.0:  # the wide route's threshold other than the default (runs before it: none)
        capped += f", scan separation {sep:g}"
    if e.get("union_with_seed"):  # the count-checked union (docs/abl.md#capped-expansion-kept-by-the-count)
        capped += " ∪ capped seed expansion"
    if ((r.get("unlearning") or {}).get("residual") or {}).get("ran"):  # docs/abl.md#residual-unlearning
        capped += f", residual unlearning (epoch {r['unlearning'].get('selected_epoch', 0)} kept)"
    return (f"| {x['attack']} | {100 * x['rate']:g}% | {x['seed']} | {x['method']}{capped} "
            f"| {_bench_abl.seed_cells(r)} "
            f"| {e.get('missed_poison', '—')} / {e.get('removed_clean', '—')} "
            f"| {pct(n.get('clean_accuracy'))} → {pct(r['clean_accuracy'])} "
            f"| {pct(n.get('attack_success_rate'))} → {pct(r['attack_success_rate'])} "
            f"| {pct(floors.get((x['attack'], x['seed'])))} | {verdict_cell(r)} "
            f"| {pct(e2e_none.get('residual'))} → {pct(e2e_abl.get('residual'))} | {time_ratio(r):.2f} "
            f"({time_ratio_per_epoch(r):.2f}) "
            f"| `{x['file']}` |")


def render(rows: list[dict[str, Any]], floors: dict[tuple[str, int], float], command: str) -> str:
    rows = sorted(rows, key=lambda x: (x["attack"], -x["rate"], not x["method"].startswith("spectral"), x["seed"]))
    out = ["# ABL retrain mode: every run", "", f"`{command}` (reads the results files; trains nothing).", "",
           "Small CNN on all 60,000 Fashion-MNIST images, 8 epochs, SGD lr 0.05 ÷10 at epochs 5 and 7 (CPU, 1 "
           "thread). T_te: isolation epochs run; seed: isolated examples of the majority label (precision); missed / "
           "clean: poisons left in the training pool / clean examples removed; verdict: the current rule on the "
           "stored report (held-out probe); clean-model ASR: the same trigger on a model trained on clean data only "
           "(`--clean-only`, the floor; — where not measured); residual: triggered test inputs on which the "
           "backdoor fires and the guard (1% FPR, same model) stays silent — no defence + guard → ABL + guard; "
           "time: ABL total / plain training (its clean stage's time per example-epoch × every training image × the "
           "epochs of the schedule, in the same run; the clean stage is one full schedule unless the expansion "
           "column says otherwise; in brackets the older per-epoch ratio, which counts plain training's epochs as "
           "short as the clean stage's, without the removed examples).", "",
           "| attack | poison | seed | expansion | T_te | isolated seed | missed / clean | CA % none → ABL "
           "| ASR % none → ABL | clean-model ASR % | verdict | residual % guard → ABL + guard | time | file |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [line(x, floors) for x in rows]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="bench/abl.py results JSONs")
    ap.add_argument("--out", default=None, help="write OUT.md (notes below the notes mark are kept); else stdout")
    args = ap.parse_args()
    paths = [Path(f) for f in args.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"abl_table: no such results file: {', '.join(missing)}")
    rows = [x for p in paths for x in rows_of(p)]
    text = render(rows, floors_of(paths), "python bench/abl_table.py " + " ".join(sys.argv[1:]))
    if args.out:
        write_markdown_keeping_notes(f"{args.out}.md", text)
    else:
        print(text)


if __name__ == "__main__":
    main()

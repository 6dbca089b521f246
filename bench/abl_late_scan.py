"""The label scans on a *fully trained* backdoored model: can poison the early model missed be found late?

ABL's retrain mode scans labels on the isolation-stage model (2 epochs) and on raw pixels. WaNet at 1% poison splits
in neither (``docs/abl.md#wanet-at-1-and-5``): its warp is learned late. This bench trains the no-defence model on
the poisoned set (the ``bench/abl.py`` schedule), and at the given epochs scans every label's features at every tap of
the model with the library's own scan (``abl/expansion.py scan_labels``, contrastive and spectral; conv taps averaged
over space), and also ranks each label's examples by a robust Mahalanobis distance (the label's median as centre,
the other labels' pooled within-class covariance as metric: the guard's feature lens without a clean reference).
It reports, per tap, label 0's split (minority share, Ashman's D) against the largest clean label's, what the scan
removed, the poison's AUROC within label 0 by that distance, and each label's share beyond the clean labels' 99th
percentile (the excess a target estimate would need).

    python bench/abl_late_scan.py --attack wanet --rate 0.01 --seed 0 --out bench/results/abl_late_scan_wanet01

About 10 min on one core (one 8-epoch training on 60,000 images; the scans take seconds).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np
import torch
from _common import cpu_name, write_results
from sklearn.metrics import roc_auc_score

from abl_guard.abl.expansion import _module_features, scan_labels
from abl_guard.abl.experiment import ExperimentConfig, prepare_data
from abl_guard.abl.models import build_model, model_taps
from abl_guard.abl.train import PlainTrainer, TrainConfig, accuracy, predict_logits, set_cpu_threads, set_seed

log = logging.getLogger("bench.abl_late_scan")
CPU = torch.device("cpu")


def tap_features(model: torch.nn.Module, spec: str, images: np.ndarray, indices: np.ndarray,
                 shape: tuple[int, ...]) -> np.ndarray:
    """One row per index: the tap's output, conv maps averaged over space (as the guard's Mahalanobis pools)."""
    f = _module_features(model, spec, images, indices, CPU, 512)
    out_shape = _output_shape(model, spec, shape)
    return f.reshape(len(f), out_shape[1], -1).mean(2) if len(out_shape) == 4 else f


def _output_shape(model: torch.nn.Module, spec: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    name, _, side = spec.partition(":")
    got: list[tuple[int, ...]] = []
    hook = dict(model.named_modules())[name].register_forward_hook(
        lambda _m, a, o: got.append(tuple((a[0] if side == "in" else o).shape)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    hook.remove()
    return got[0]


def robust_distances(f: np.ndarray, y: np.ndarray, k: int) -> dict[int, np.ndarray]:
    """Per label: each example's Mahalanobis distance from the label's median under the other labels' pooled
    within-class covariance (ridge 1e-3 of its mean variance), and the other labels' own distances (key -1 - c)."""
    med = np.stack([np.median(f[y == c], 0) for c in range(k)])
    out: dict[int, np.ndarray] = {}
    for c in range(k):
        others = y != c
        cen = f[others] - med[y[others]]
        cov = np.cov(cen.T)
        cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))
        prec = np.linalg.inv(cov)
        d = f[y == c] - med[c]
        out[c] = np.einsum("ij,jk,ik->i", d, prec, d)
        out[-1 - c] = np.einsum("ij,jk,ik->i", cen, prec, cen)
    return out


def scan_one(f: np.ndarray, labels: np.ndarray, pool: np.ndarray, poison: np.ndarray, target: int,
             seed: int) -> dict[str, Any]:
    """Both label scans and the robust distance on one tap's features of the pool."""
    k = int(labels.max()) + 1
    full = np.zeros((len(labels), f.shape[1]), np.float32)
    full[pool] = f
    row: dict[str, Any] = {"dim": int(f.shape[1])}
    for method in ("contrastive", "spectral"):
        s = scan_labels(full, labels, pool, method=method, random_state=seed)
        splits = {r["label"]: r for r in s.report["labels"]}
        row[method] = {"found": s.report.get("target"), "removed": int(len(s.removed)),
                       "removed_poison": int(np.isin(s.removed, poison).sum()),
                       "target_split": [round(splits[target]["minority"], 3), round(splits[target]["separation"], 2)],
                       "max_clean_separation": round(max(r["separation"] for c, r in splits.items() if c != target),
                                                     2)}
    y = labels[pool]
    dist = robust_distances(f, y, k)
    excess = {c: float((dist[c] > np.quantile(dist[-1 - c], 0.99)).mean()) for c in range(k)}
    in_target = np.isin(pool[y == target], poison)
    row["robust"] = {"target_auroc": round(float(roc_auc_score(in_target, dist[target])), 4) if in_target.any()
                     else None, "excess": {c: round(v, 3) for c, v in excess.items()},
                     "target_rank": int(sorted(excess, key=excess.get, reverse=True).index(target)) + 1}
    return row


def render(rec: dict[str, Any]) -> str:
    out = ["# Label scans on the fully trained backdoored model", "", f"`{rec['command']}` — {rec['cpu']}", "",
           f"{rec['attack']} at {100 * rec['rate']:g}%, seed {rec['seed']}, target {rec['target']}: "
           f"{rec['n_poison']} poisoned of {rec['n']} training images, a 2% held-out split left out. Scan: label 0's "
           "split (minority share, D) / the largest clean label's D; found: the label the scan picked, removed "
           "(poison). Robust: the poison's AUROC within the target label by the robust Mahalanobis distance, and the "
           "target label's rank among the 10 labels by its share beyond the clean 99th percentile (its share / the "
           "largest clean label's).", "",
           "| epoch | CA % | ASR % | tap | contrastive: target split / clean D | found (removed, poison) | spectral: "
           "target split / clean D | found (removed, poison) | robust: AUROC in target | target rank (share / "
           "largest clean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in rec["epochs"]:
        for tap, r in e["taps"].items():
            cells = []
            for m in ("contrastive", "spectral"):
                s = r[m]
                cells += [f"{100 * s['target_split'][0]:.1f}%, {s['target_split'][1]:.2f} / "
                          f"{s['max_clean_separation']:.2f}",
                          "—" if s["found"] is None else f"{s['found']} ({s['removed']}, {s['removed_poison']})"]
            ex = r["robust"]["excess"]
            clean = max(v for c, v in ex.items() if int(c) != rec["target"])
            cells += [str(r["robust"]["target_auroc"]),
                      f"{r['robust']['target_rank']} ({100 * ex[rec['target']]:.1f}% / {100 * clean:.1f}%)"]
            out.append(f"| {e['epoch']} | {100 * e['ca']:.2f} | {100 * e['asr']:.2f} | {tap} | " + " | ".join(cells)
                       + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="wanet")
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--lr-milestones", default="5,7")
    ap.add_argument("--scan-at", default="2,8", help="comma-separated epochs after which to scan")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/abl_late_scan_wanet01")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_cpu_threads(args.threads)
    target = 0
    cfg = ExperimentConfig(attack=args.attack, attack_params={"rate": args.rate, "target": target},
                           train=TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, device="cpu",
                                             lr_milestones=tuple(int(m) for m in args.lr_milestones.split(",") if m)))
    data = prepare_data(cfg)
    spec = data.train.spec
    set_seed(args.seed)
    model = build_model("small-cnn", spec.input_shape[0], spec.num_classes, spec.input_shape[1], spec.mean, spec.std)
    labels, poison = data.train.labels, np.asarray(data.poison_indices)
    rng = np.random.default_rng(args.seed)
    pool = np.setdiff1d(np.arange(len(labels)), rng.choice(len(labels), int(0.02 * len(labels)), replace=False))
    trainer = PlainTrainer(model, data.train.images, labels, cfg.train)
    scan_at = {int(e) for e in args.scan_at.split(",")}
    epochs = []
    for epoch in range(1, args.epochs + 1):
        trainer.epoch(quiet=True)
        if epoch not in scan_at:
            continue
        assert data.triggered is not None
        asr = float((predict_logits(model, data.triggered.images, CPU).argmax(1) == target).mean())
        rec: dict[str, Any] = {"epoch": epoch, "ca": accuracy(model, data.test.images, data.test.labels, CPU),
                               "asr": asr, "taps": {}}
        for tap, mod in model_taps(model).items():
            f = tap_features(model, mod, data.train.images, pool, spec.input_shape)
            rec["taps"][tap] = scan_one(f, labels, pool, poison, target, args.seed)
            log.info("epoch %d %s: %s", epoch, tap, rec["taps"][tap])
        epochs.append(rec)
    record = {"command": "python bench/abl_late_scan.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "attack": args.attack, "rate": args.rate, "seed": args.seed, "target": target,
              "n": int(len(labels)), "n_poison": int(len(poison)), "epochs": epochs}
    write_results(args.out, record, render(record))


if __name__ == "__main__":
    main()

"""Residual unlearning: which unlearning removes what a retrained model re-learned from the poison the removal missed.

One retrain-mode ABL run (``bench/abl.py``'s setting: the small CNN on all 60,000 Fashion-MNIST images, 8 epochs, lr
0.05 stepped at 5 and 7) with the residual unlearning and the count-checked union *off* (``residual_unlearning_epochs``
0, ``expansion_union_sd`` 0), so the removal and the retrained model are what they were before both; then each
variant unlearns the run's removed set from a copy of that model — joint steps (one batch of the removed set, one of
the rest of the pool) for a few epochs — and the clean accuracy and attack success after each epoch are recorded.
A variant is ``lr:ascent:epochs``, ascent ``negated-ce`` (the paper's term, bounded at CE 5 as the unlearn mode does)
or ``complement`` (``-log(1 - p_label)``). The library's default (complement, lr 2e-3, 5 epochs) is one of them.

    python bench/abl_residual.py --attack wanet --rate 0.05 --seed 1 --out bench/results/abl_residual_wanet_r05_s1 \\
        --variants 5e-4:negated-ce:3,2e-3:negated-ce:3,5e-4:complement:3,2e-3:complement:5,1e-2:complement:3

About 7 minutes for the ABL run and half a minute per variant epoch on one core. Writes ``--out``.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import cpu_name, write_results

from abl_guard.abl.abl import ABLConfig, run_abl
from abl_guard.abl.experiment import ExperimentConfig, make_evaluator, prepare_data
from abl_guard.abl.losses import ascent_term
from abl_guard.abl.models import build_model
from abl_guard.abl.train import TrainConfig, set_seed

log = logging.getLogger("bench.abl_residual")
CPU = torch.device("cpu")


def variant(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, removed: np.ndarray,
            rest: np.ndarray, lr: float, ascent: str, epochs: int, seed: int,
            evaluate: Any) -> list[dict[str, float]]:
    """Joint unlearning of ``removed`` from a copy of ``model``; CA / ASR after every epoch."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        m.train()
        order = rng.permutation(removed)
        for i in range(0, len(order), 128):
            b, c = order[i:i + 128], rng.choice(rest, 128, replace=False)
            logits = m(torch.cat([images[b], images[c]]))
            lb, yb = logits[:len(b)], labels[b]
            term = ascent_term(lb, yb, ascent)
            if ascent == "negated-ce":  # bounded as the unlearn mode's default (CE 5)
                term = term * (F.cross_entropy(lb, yb, reduction="none").detach() < 5.0)
            loss = F.cross_entropy(logits[len(b):], labels[c]) + term.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        m.eval()
        out.append(evaluate(m))
        log.info("lr %g %s epoch %d: %s", lr, ascent, len(out), out[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="wanet")
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", default="2e-3:complement:5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/abl_residual")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from --out's JSON")
    args = ap.parse_args()
    if args.render:
        rerender(args.out)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train = TrainConfig(epochs=8, lr=0.05, lr_milestones=(5, 7), seed=args.seed, device="cpu", precision="fp32",
                        memory_format="contiguous")
    cfg = ExperimentConfig(attack=args.attack, attack_params={"rate": args.rate, "target": 0}, train=train)
    data = prepare_data(cfg)
    evaluate = make_evaluator(data, CPU)
    spec = data.train.spec
    set_seed(args.seed)
    model = build_model("small-cnn", spec.input_shape[0], spec.num_classes, spec.input_shape[1], spec.mean, spec.std)
    abl_cfg = ABLConfig.from_train(train, {"mode": "retrain", "eval_every": 0, "residual_unlearning_epochs": 0,
                                                 "expansion_union_sd": 0.0})
    res = run_abl(model, data.train.images, data.train.labels, abl_cfg, evaluate=evaluate,
                  poison_indices=data.poison_indices, quiet=True)
    model.eval()
    base = evaluate(model)
    poison = np.asarray(data.poison_indices)
    images = torch.as_tensor(data.train.images).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.as_tensor(data.train.labels).long()
    rest = np.setdiff1d(np.setdiff1d(np.arange(len(labels)), res.holdout), res.removed)
    rows = []
    for spec_ in [v for v in args.variants.split(",") if v.strip()]:
        lr, ascent, epochs = spec_.split(":")
        traj = variant(model, images, labels, res.removed, rest, float(lr), ascent, int(epochs), args.seed, evaluate)
        rows.append({"lr": float(lr), "ascent": ascent, "epochs": int(epochs), "trajectory": traj})
    record = {"command": "python bench/abl_residual.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "threads": args.threads, "torch": torch.__version__, "attack": args.attack, "rate": args.rate,
              "seed": args.seed, "verdict": res.report["verdict"]["status"],
              "held_out_probe": res.report["verdict"].get("held_out_probe"),
              "n_removed": int(len(res.removed)), "removed_poison": int(np.isin(res.removed, poison).sum()),
              "n_poison": int(len(poison)), "retrained": base, "variants": rows,
              "wall_seconds": time.perf_counter() - t_start}
    write_results(args.out, record, render(record))


def rerender(path: str) -> None:
    """Rewrite ``path``.md from its JSON (``--render``)."""
    out = Path(path)
    out.with_suffix(".md").write_text(render(json.loads(out.with_suffix(".json").read_text())))


def render(r: dict[str, Any]) -> str:
    probe = "—" if r["held_out_probe"] is None else f"{r['held_out_probe']:.2f}"
    lines = ["# Residual unlearning variants", "", f"`{r['command']}` — {r['cpu']}, {r['threads']} thread(s), "
             f"torch {r['torch']}; wall {r['wall_seconds'] / 60:.1f} min.", "",
             f"{r['attack']} {r['rate']:.0%} seed {r['seed']}: the retrain-mode run (residual unlearning, union off) "
             f"removed {r['n_removed']} examples ({r['removed_poison']} of {r['n_poison']} poisons); its retrained "
             f"model: CA {r['retrained']['clean_accuracy']:.2%}, ASR {r['retrained']['attack_success_rate']:.2%}, "
             f"verdict `{r['verdict']}` (held-out probe {probe}).", "",
             "Each variant unlearns the removed set from a copy of that model (joint: one batch of it and one of the "
             "rest of the pool per step); cells: CA % / ASR % after each epoch.", "",
             "| lr | ascent | " + " | ".join(f"epoch {i + 1}" for i in range(max(v["epochs"] for v in r["variants"])))
             + " |", "|---|---|" + "---|" * max(v["epochs"] for v in r["variants"])]
    for v in r["variants"]:
        cells = [f"{100 * t['clean_accuracy']:.2f} / {100 * t['attack_success_rate']:.2f}" for t in v["trajectory"]]
        cells += ["—"] * (max(w["epochs"] for w in r["variants"]) - len(cells))
        lines.append(f"| {v['lr']:g} | {v['ascent']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

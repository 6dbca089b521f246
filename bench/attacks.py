"""Does each attack work at its default settings? ASR per backdoor attack, success per adversarial attack.

Fashion-MNIST, a random training subset, the small CNN trained briefly with plain SGD (no defence). For every
backdoor attack: poison the subset with the attack's defaults (rate 0.1, target 0), train a fresh model with the same
seed, and report clean accuracy (CA) and attack success rate (ASR: triggered non-target test images classified as the
target). The clean model's "ASR" on each trigger is the floor to compare against (how often the trigger alone moves a
*clean* model to the target). The clean model also serves as the label-consistent attack's surrogate and as the
victim of FGSM / PGD / CW-L2, whose success rates are reported before and after uint8 quantisation.

Run:  .venv/bin/python bench/attacks.py            (about 30 minutes on 1 busy CPU thread)
Writes bench/results/attacks.json and bench/results/attacks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from _common import cpu_name, write_results  # noqa: E402

from abl_guard.abl.data import load_dataset  # noqa: E402
from abl_guard.abl.models import build_model  # noqa: E402
from abl_guard.abl.train import PlainTrainer, TrainConfig, accuracy, set_seed  # noqa: E402
from abl_guard.attacks import make_attack  # noqa: E402
from abl_guard.attacks.adversarial import evaluate, quantize, run_attack  # noqa: E402

BACKDOORS = ["badnets", "blend", "trojan", "sig", "wanet", "label-consistent"]
CPU = torch.device("cpu")


def train(images: np.ndarray, labels: np.ndarray, spec, epochs: int, seed: int, lr: float,
          threads: int = 1) -> torch.nn.Module:
    """Plain SGD with abl-guard's trainer (momentum 0.9 Nesterov, weight decay 5e-4, batch 128; lr / 10 in the last
    epoch, for a steadier final clean accuracy)."""
    set_seed(seed)
    c, h, _ = spec.input_shape
    model = build_model("small-cnn", c, spec.num_classes, h, spec.mean, spec.std)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=lr, momentum=0.9, weight_decay=5e-4,
                      lr_milestones=(epochs - 1,) if epochs > 1 else (), seed=seed, device="cpu", precision="fp32",
                      memory_format="contiguous")
    trainer = PlainTrainer(model, images, labels, cfg)
    torch.set_num_threads(threads)  # the trainer's device selection sets all cores; the benchmark pins its threads
    for _ in range(epochs):
        trainer.epoch(quiet=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05, help="higher than train's 0.01 default: few epochs here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lc-steps", type=int, default=20, help="PGD steps for label-consistent (default attack: 100)")
    ap.add_argument("--adv-n", type=int, default=500, help="test images attacked by FGSM/PGD")
    ap.add_argument("--cw-n", type=int, default=200, help="test images attacked by CW-L2")
    ap.add_argument("--attacks", default=",".join(BACKDOORS))
    ap.add_argument("--long", default="wanet:10", metavar="NAME:EPOCHS[,...]",
                    help="extra rows: these attacks trained longer (slow-learning triggers); '' for none")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "attacks"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train_full = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    idx = np.sort(np.random.default_rng(args.seed).choice(len(train_full), args.train_size, replace=False))
    tr = train_full.subset(idx)
    spec, k = tr.spec, tr.spec.num_classes

    t0 = time.perf_counter()
    clean = train(tr.images, tr.labels, spec, args.epochs, args.seed, args.lr, args.threads)
    clean_seconds = time.perf_counter() - t0
    clean_ca = accuracy(clean, test.images, test.labels, CPU)
    print(f"clean: CA {clean_ca:.4f} ({clean_seconds:.0f}s)", flush=True)

    rows = []
    runs = [(name, args.epochs) for name in args.attacks.split(",") if name]
    runs += [(item.split(":")[0], int(item.split(":")[1])) for item in args.long.split(",") if item]
    for name, epochs in runs:
        params = {"seed": args.seed}
        if name == "label-consistent":
            params.update(model=clean, steps=args.lc_steps)
        atk = make_attack(name, **params)
        t0 = time.perf_counter()
        poisoned = atk.poison(tr.images, tr.labels, k)
        poison_seconds = time.perf_counter() - t0
        trig = atk.triggered(test.images, test.labels, k)
        t0 = time.perf_counter()
        model = train(poisoned.images, poisoned.labels, spec, epochs, args.seed, args.lr, args.threads)
        seconds = time.perf_counter() - t0
        row = {
            "attack": name, "epochs": epochs,
            "params": {k_: v for k_, v in atk.params().items() if k_ != "model"},
            "clean_label": atk.clean_label, "n_poisoned": int(len(poisoned.poison_indices)),
            "n_cross": int(len(getattr(poisoned, "cross_indices", []))),
            "clean_accuracy": accuracy(model, test.images, test.labels, CPU),
            "attack_success_rate": accuracy(model, trig.images, trig.labels, CPU),
            "clean_model_asr": accuracy(clean, trig.images, trig.labels, CPU),
            "poison_seconds": poison_seconds, "train_seconds": seconds,
            "mean_abs_pixel_change": float(np.abs(trig.images.astype(np.int16)
                                                  - test.images[trig.indices].astype(np.int16)).mean()),
        }
        if getattr(atk, "last_perturbation", None):
            row["label_consistent_perturbation"] = atk.last_perturbation
        rows.append(row)
        print(f"{name} ({epochs} epochs): CA {row['clean_accuracy']:.4f} ASR {row['attack_success_rate']:.4f} "
              f"(clean model {row['clean_model_asr']:.4f}; {row['n_poisoned']} poisoned; {seconds:.0f}s)", flush=True)

    adv = []
    x, y = test.images[: args.adv_n], test.labels[: args.adv_n]
    for name, params, n in [("fgsm", {"eps": 0.1}, args.adv_n), ("pgd", {"eps": 0.1}, args.adv_n),
                            ("pgd", {"eps": 0.05}, args.adv_n), ("cw", {}, args.cw_n)]:
        if n <= 0:
            continue
        t0 = time.perf_counter()
        res = run_attack(name, clean, x[:n], y[:n], seed=args.seed, **params)
        seconds = time.perf_counter() - t0
        q = quantize(res.images, x[:n], res.params.get("eps"))
        _, success_q = evaluate(clean, q, y[:n])
        ok = res.clean_correct
        delta = res.images - x[:n] / 255.0
        succ = res.success & ok
        adv.append({
            **res.summary(), "success_rate_uint8": float(success_q[ok].mean()), "seconds": seconds,
            "median_linf_of_successes": float(np.median(np.abs(delta[succ]).reshape(succ.sum(), -1).max(1)))
            if succ.any() else None,
            "median_l2_of_successes": float(np.median(np.sqrt((delta[succ] ** 2).reshape(succ.sum(), -1).sum(1))))
            if succ.any() else None,
        })
        print(f"{name} {params}: success {res.success_rate:.4f} (uint8 {adv[-1]['success_rate_uint8']:.4f}) "
              f"{seconds:.0f}s", flush=True)

    record = {
        "command": "python bench/attacks.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "dataset": "fashion-mnist", "train_size": args.train_size, "test_size": len(test), "epochs": args.epochs,
        "lr": args.lr,
        "arch": "small-cnn", "seed": args.seed, "lc_steps": args.lc_steps,
        "clean": {"clean_accuracy": clean_ca, "train_seconds": clean_seconds},
        "backdoor": rows, "adversarial": adv,
    }
    write_results(args.out, record, render(record))


def render(r: dict) -> str:
    lines = [
        "# Attack suite: does each attack work at its defaults?",
        "",
        f"`{r['command']}` — {r['cpu']}, {r['threads']} thread(s), torch {r['torch']}.",
        "",
        f"Fashion-MNIST, {r['train_size']:,} random training images, full test set ({r['test_size']:,}); "
        f"{r['arch']} trained {r['epochs']} epochs with plain SGD, lr {r['lr']} (no defence), seed {r['seed']}. "
        "Every backdoor attack uses its defaults (rate 0.1 of the training set, target 0); clean-label attacks "
        "can poison at most the target class. ASR = triggered non-target test images classified as the "
        "target; \"clean-model ASR\" is the same trigger shown to the clean model (the floor). "
        "Label-consistent uses the clean model as its "
        f"surrogate with {r['lc_steps']} PGD steps (its default is 100).",
        "",
        f"Clean model: CA {100 * r['clean']['clean_accuracy']:.2f}% ({r['clean']['train_seconds']:.0f}s).",
        "",
        "| attack | label | poisoned (+cross) | epochs | CA % | ASR % | clean-model ASR % | mean abs pixel change "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in r["backdoor"]:
        cross = f" (+{b['n_cross']})" if b["n_cross"] else ""
        lines.append(
            f"| {b['attack']} | {'clean' if b['clean_label'] else 'dirty'} | {b['n_poisoned']}{cross} | "
            f"{b['epochs']} | {100 * b['clean_accuracy']:.2f} | {100 * b['attack_success_rate']:.2f} | "
            f"{100 * b['clean_model_asr']:.2f} | {b['mean_abs_pixel_change']:.1f} | {b['train_seconds']:.0f} |")
    lines += [
        "",
        "Adversarial examples against the clean model (first test images; success over the correctly classified "
        "ones; uint8 = after rounding inside the L∞ ball):",
        "",
        "| attack | params | n | success % | success after uint8 % | median L∞ | median L2 | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in r["adversarial"]:
        keys = ("eps", "steps") if a["attack"] != "cw" else ("c", "steps", "binary_search_steps")
        params = ", ".join(f"{k}={a[k]:.3g}" if isinstance(a[k], float) else f"{k}={a[k]}" for k in keys if k in a)
        linf = "–" if a["median_linf_of_successes"] is None else f"{a['median_linf_of_successes']:.3f}"
        l2 = "–" if a["median_l2_of_successes"] is None else f"{a['median_l2_of_successes']:.3f}"
        lines.append(f"| {a['attack']} | {params} | {a['n']} | {100 * a['success_rate']:.2f} | "
                     f"{100 * a['success_rate_uint8']:.2f} | {linf} | {l2} | {a['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

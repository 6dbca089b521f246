"""Anti-Backdoor Learning on Fashion-MNIST: CA / ASR without defence vs with ABL, isolation precision, per attack.

For every backdoor attack registered in ``attacks.REGISTRY`` when the script runs (10% poisoning, target 0, each
attack's other defaults) and every seed: a model trained without defence, a model trained with ABL (same total
epochs), and — once per seed — a model trained on the clean data (the CA reference; also label-consistent's
surrogate model). Reported as mean ± std over seeds, with ABL's isolation precision / recall / AUROC at T_te, the
CA / ASR after each ABL stage and what the unlearning guard did.

CPU schedule (the paper's is 100 epochs: T_te = 20, then 80, then unlearning): a scaled-down version with the same
proportions — a random 20,000-image training subset, T = 10 epochs (isolation T_te = 2 = 20% of T, clean stage 8),
then 5 unlearning epochs at lr 5e-4; the small CNN, SGD lr 0.01, batch 128; the full 10,000-image test set.
ABL runs with the library defaults (class-relative isolation score, joint bounded unlearning, the guard) and the
isolation ratio of ``--isolation-ratio`` (the paper's 1% by default; the committed main table uses 5%, and
``abl_converged_p1.md`` the paper's 1% on converged models, an ABL-only run with ``--baselines``). Every committed
results file, with its command, is indexed in ``bench/results/README.md``.
``--lga-compare`` runs the isolation stage alone with both LGA forms and reports the isolation precision of both
ranking scores (raw loss and class-relative) on the same losses; ``--unlearning-sweep`` runs unguarded unlearning
variants from one clean-stage model.

Runs are cached in the JSON (key: attack, seed, kind, settings), so the script can be stopped and re-run to continue,
and attacks that land later are added by re-running with ``--attacks``.

    .venv/bin/python bench/abl.py --quick                    # smoke run, about a minute
    .venv/bin/python bench/abl.py --attacks badnets          # BadNets, 3 seeds
    .venv/bin/python bench/abl.py                            # every registered attack
    .venv/bin/python bench/abl.py --lga-compare --seeds 0    # flooding vs per-example, raw vs class-relative
    # the committed tables (two processes, one thread each, about an hour on 2 cores):
    .venv/bin/python bench/abl.py --isolation-ratio 0.05 --threads 1 &
    .venv/bin/python bench/abl.py --isolation-ratio 0.01 --threads 1 --baselines bench/results/abl.json \
        --out bench/results/abl_p1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from _common import cpu_name, write_markdown_keeping_notes  # noqa: E402

from abl_guard.abl.abl import (  # noqa: E402
    ISOLATION_LABELS,
    ISOLATION_SCORES,
    ABLConfig,
    cycle_batches,
    guard_metrics,
    isolate_lowest,
    isolation_report,
    isolation_scores,
    run_abl,
    unlearning_epoch,
)
from abl_guard.abl.config import (  # noqa: E402
    EXPANSION_METHODS,
    INPUT_SCAN_ORDERS,
    RECHECK_METHODS,
    RESTARTS,
    RETRAIN_SCHEDULES,
    SCAN_METHODS,
)
from abl_guard.abl.experiment import ExperimentConfig, PreparedData, make_evaluator, prepare_data  # noqa: E402
from abl_guard.abl.models import build_model  # noqa: E402
from abl_guard.abl.report import found_by_input_scan  # noqa: E402
from abl_guard.abl.train import ArrayBatches, TrainConfig, make_optimizer, set_seed, train_plain  # noqa: E402
from abl_guard.attacks import REGISTRY  # noqa: E402

CPU = torch.device("cpu")
#: settings that change only the ABL runs (the no-defence and clean-data runs are cached across them)
ABL_ONLY = ("isolation_epochs", "unlearning_epochs", "unlearning_lr", "lga", "holdout", "max_ca_drop",
            "isolation_score", "unlearning", "isolation_ratio", "unlearning_bound", "isolation_labels", "abl_mode",
            "expansion_method", "expansion_scan_share", "isolation_extra_epochs", "expansion_scan_method",
            "expansion_scan_separation", "retrain_epochs", "expansion_input_separation", "input_scan", "restart",
            "expansion_capped_count_sd", "expansion_off_label_ratio", "expansion_scan_count_sd",
            "expansion_recheck_epoch", "expansion_recheck_scale", "expansion_recheck_passes",
            "expansion_recheck_min_mean", "expansion_recheck_method", "expansion_recheck_count_sd")
#: the Setting sentence's words for each --restart (after "a fresh model trained the full T on the rest")
RESTART_SETTING = {"always": "",
                   "found": " — or, when nothing beyond the seed was found, the isolation model continued to T",
                   "never": " — or rather the isolation model continued to T on the rest, whatever was found"}
#: the rankings --lga-compare scores on the same losses: (name, isolation score, reference quantile)
RANKINGS = [("class-relative", "class-relative", 0.5), ("class-relative@0.75", "class-relative", 0.75),
            ("loss", "loss", 0.5)]
#: unguarded unlearning variants of --unlearning-sweep: (objective, BatchNorm mode, lr, ascent term, ascent bound);
#: the first is the library default. (The sweep committed in abl.md, as of commit 3363b3b, compared the official
#: ascent at 5e-4 / 1e-4 and frozen BatchNorm, unbounded.)
SWEEP = [("joint", "train", 5e-4, "negated-ce", 5.0), ("joint", "train", 5e-4, "complement", 5.0),
         ("joint", "train", 2e-3, "complement", 5.0), ("joint", "train", 5e-4, "complement", 0.0)]
log = logging.getLogger("bench.abl")


def sweep_variants(spec: str | None) -> list[tuple[str, str, float, str, float]]:
    """``--sweep-variants``: ``objective:bn:lr:ascent:bound`` items, comma-separated (None: :data:`SWEEP`)."""
    if not spec:
        return SWEEP
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 5:
            raise SystemExit(f"--sweep-variants: {item!r} is not objective:bn:lr:ascent:bound")
        mode, bn, lr, ascent, bound = parts
        out.append((mode, bn, float(lr), ascent, float(bound)))
    return out


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"train_limit": args.train_limit, "test_limit": args.test_limit, "epochs": args.epochs,
            "isolation_epochs": args.isolation_epochs, "unlearning_epochs": args.unlearning_epochs,
            "unlearning_lr": args.unlearning_lr, "lr": args.lr, "rate": args.rate, "lga": args.lga,
            "lc_steps": args.lc_steps, "holdout": args.holdout, "max_ca_drop": args.max_ca_drop,
            "isolation_score": args.isolation_score, "unlearning": args.unlearning,
            "isolation_ratio": args.isolation_ratio, "unlearning_bound": args.unlearning_bound,
            # only when not the old behaviour, so that results recorded before the options existed keep their keys
            **({"isolation_labels": args.isolation_labels} if args.isolation_labels != "all" else {}),
            **({"abl_mode": args.abl_mode} if args.abl_mode != "unlearn" else {}),
            # retrain runs recorded before spectral expansion existed have no key: they used the classifier
            **({"expansion_method": args.expansion_method}
               if args.abl_mode == "retrain" and args.expansion_method != "classifier" else {}),
            # retrain runs recorded before the label scan existed have no key: they had none
            **({"expansion_scan_share": args.scan_share} if args.abl_mode == "retrain" else {}),
            # nor before the isolation's extension existed (it had none: 0)
            **({"isolation_extra_epochs": args.isolation_extra}
               if args.abl_mode == "retrain" and args.isolation_extra else {}),
            # nor before the contrastive scan existed (they scanned spectrally)
            **({"expansion_scan_method": args.scan_method}
               if args.abl_mode == "retrain" and args.scan_method != "spectral" else {}),
            # nor before the remaining-schedule option existed (a whole schedule)
            **({"retrain_epochs": args.retrain_epochs}
               if args.abl_mode == "retrain" and args.retrain_epochs != "full" else {}),
            # nor before its wide-separation route existed (off)
            **({"expansion_scan_separation": args.scan_separation}
               if args.abl_mode == "retrain" and args.scan_method == "contrastive" and args.scan_separation else {}),
            # nor before the input scan existed (off)
            **({"expansion_input_separation": args.input_separation}
               if args.abl_mode == "retrain" and args.input_separation else {}),
            # nor before the input scan could run first (it ran after the isolation epochs)
            **({"input_scan": args.input_scan}
               if args.abl_mode == "retrain" and args.input_separation and args.input_scan != "last" else {}),
            # nor before the isolation model could continue when nothing was found (always a fresh model)
            **({"restart": args.restart} if args.abl_mode == "retrain" and args.restart != "always" else {}),
            # nor before the capped expansion's count check existed (off)
            **({"expansion_capped_count_sd": args.capped_count_sd}
               if args.abl_mode == "retrain" and args.capped_count_sd else {}),
            # nor before the off-label scan existed (off)
            **({"expansion_off_label_ratio": args.off_label_ratio}
               if args.abl_mode == "retrain" and args.off_label_ratio else {}),
            # nor before the contrastive scan's count-matched route existed (off)
            **({"expansion_scan_count_sd": args.scan_count_sd}
               if args.abl_mode == "retrain" and args.scan_method == "contrastive" and args.scan_count_sd else {}),
            # nor before the clean stage's recheck existed (off)
            **({"expansion_recheck_epoch": args.recheck_epoch}
               if args.abl_mode == "retrain" and args.recheck_epoch else {}),
            **({"expansion_recheck_scale": args.recheck_scale}
               if args.abl_mode == "retrain" and args.recheck_epoch and args.recheck_scale != 1.0 else {}),
            # nor before a recheck could make more than one pass, or skip one (a single pass; no run was skipped)
            **({"expansion_recheck_passes": args.recheck_passes}
               if args.abl_mode == "retrain" and args.recheck_epoch and args.recheck_passes != 1 else {}),
            **({"expansion_recheck_min_mean": args.recheck_min_mean}
               if args.abl_mode == "retrain" and args.recheck_epoch and args.recheck_min_mean != 0.5 else {}),
            # nor before the pixel-space recheck existed (the confidence rule)
            **({"expansion_recheck_method": args.recheck_method}
               if args.abl_mode == "retrain" and args.recheck_epoch and args.recheck_method != "confidence" else {}),
            # nor before the pixel recheck's count top-up existed (off)
            **({"expansion_recheck_count_sd": args.recheck_count_sd}
               if args.abl_mode == "retrain" and args.recheck_epoch and args.recheck_method.startswith("pixel")
               and args.recheck_count_sd else {}),

            **({"lr_milestones": milestones_of(args)} if args.lr_milestones else {})}


def command_line() -> str:
    """This run's command as a page records it: a re-render (``--render``) keeps the command that made the runs."""
    return " ".join(["python bench/abl.py"] + [a for a in sys.argv[1:] if a != "--render"])


def recheck_epochs(a: argparse.Namespace) -> str:
    """The clean-stage epochs after which the recheck runs, in words ("epoch 1", "epochs 1 and 2", "epochs 1, 2
    and 3")."""
    epochs = [str(a.recheck_epoch + i) for i in range(max(1, a.recheck_passes))]
    return f"epoch {epochs[0]}" if len(epochs) == 1 else "epochs " + ", ".join(epochs[:-1]) + " and " + epochs[-1]


def milestones_of(args: argparse.Namespace) -> list[int]:
    return [int(m) for m in args.lr_milestones.split(",") if m.strip()] if args.lr_milestones else []


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = settings_of(args)
        self.path = Path(f"{args.out}.json")
        self.rows: list[dict[str, Any]] = []
        if self.path.exists() and not args.fresh:
            old = json.loads(self.path.read_text())
            self.rows = old.get("runs", [])
        self.clean_models: dict[int, torch.nn.Module] = {}

    # ------------------------------------------------------------------------------------------ caching
    def key(self, attack: str, seed: int, kind: str) -> dict[str, Any]:
        # ABL knobs do not change the no-defence and clean-data runs: keep those cached across ABL settings
        abl_only = ABL_ONLY
        settings = (self.settings if kind.startswith(("abl", "isolation")) else
                    {k: v for k, v in self.settings.items() if k not in abl_only})
        return {"attack": attack, "seed": seed, "kind": kind, "settings": settings}

    def load_baselines(self) -> None:
        """``--baselines``: take the no-defence and clean-data runs of another results file (an ABL-only run)."""
        path = Path(self.args.baselines)
        if not path.exists():
            return
        want = self.args.guard_detectors.split(",") if self.args.end_to_end else None
        for r in json.loads(path.read_text())["runs"]:
            if r["kind"] in ("none", "clean") and r["settings"] == self.key(r["attack"], r["seed"], r["kind"])[
                    "settings"] and self.cached(r["attack"], r["seed"], r["kind"]) is None:
                have = r.get("end_to_end", {}).get("detectors")
                if want is not None and have is not None and list(have) != want:
                    raise SystemExit(f"error: {path}'s no-defence guard is `{','.join(have)}`, this run's "
                                     f"`{','.join(want)}`: pass --guard-detectors {','.join(have)}, so that guard "
                                     "only and ABL + guard compare one guard")
                self.rows.append(r)

    def merge(self, path: str) -> int:
        """``--merge``: add every run of another results file (e.g. a concurrent process on other attacks / seeds)
        that this file does not have yet; returns how many were added."""
        added = 0
        for r in json.loads(Path(path).read_text())["runs"]:
            if not any(all(x.get(f) == r.get(f) for f in ("attack", "seed", "kind", "settings")) for x in self.rows):
                self.rows.append(r)
                added += 1
        return added

    def cached(self, attack: str, seed: int, kind: str) -> dict[str, Any] | None:
        k = self.key(attack, seed, kind)
        return next((r for r in self.rows if all(r.get(f) == v for f, v in k.items())), None)

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if not all(r.get(f) == row[f] for f in ("attack", "seed", "kind",
                                                                                  "settings"))]
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"command": command_line(), "cpu": cpu_name(),
                "threads": self.args.threads, "torch": torch.__version__, "runs": self.rows}
        self.path.write_text(json.dumps(blob, indent=1, default=float))

    # ------------------------------------------------------------------------------------------ training
    def exp_cfg(self, attack: str | None, seed: int, params: dict[str, Any] | None = None) -> ExperimentConfig:
        a = self.args
        return ExperimentConfig(
            attack=attack, attack_params={"rate": a.rate, "target": 0, **(params or {})},
            train=TrainConfig(epochs=a.epochs, lr=a.lr, lr_milestones=tuple(milestones_of(a)), seed=seed,
                              device="cpu", precision="fp32", memory_format="contiguous"),
            train_limit=a.train_limit or None, test_limit=a.test_limit)

    def fresh_model(self, data: PreparedData, seed: int) -> torch.nn.Module:
        set_seed(seed)
        spec = data.train.spec
        c, h, _ = spec.input_shape
        return build_model("small-cnn", c, spec.num_classes, h, spec.mean, spec.std)

    def clean_model(self, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
        cfg = self.exp_cfg(None, seed)
        data = prepare_data(cfg)
        model = self.fresh_model(data, seed)
        t0 = time.perf_counter()
        train_plain(model, data.train.images, data.train.labels, cfg.train, None, quiet=True)
        secs = time.perf_counter() - t0
        model.eval()
        row = {**self.key("none", seed, "clean"), "clean_accuracy": make_evaluator(data, CPU)(model)["clean_accuracy"],
               "seconds": secs}
        return model, row

    def get_clean(self, seed: int) -> torch.nn.Module | None:
        """The clean-data model of ``seed`` (trained when needed, kept in ``--work``; label-consistent's surrogate)."""
        if seed in self.clean_models:
            return self.clean_models[seed]
        key = json.dumps(self.key("none", seed, "clean")["settings"], sort_keys=True)
        path = Path(self.args.work) / f"clean_seed{seed}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
        if path.exists() and self.cached("none", seed, "clean") is not None:
            data = prepare_data(self.exp_cfg(None, seed))
            model = self.fresh_model(data, seed)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            model, row = self.clean_model(seed)
            self.add(row)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
            log.info("seed %d clean model: CA %.4f (%.0fs)", seed, row["clean_accuracy"], row["seconds"])
        self.clean_models[seed] = model.eval()
        return self.clean_models[seed]

    def clean_floor(self, seed: int, attacks: list[str]) -> None:
        """``--clean-only``: the clean-data model's ASR under each attack's test trigger, added to its row (how often
        a model that never saw the poison predicts the target for triggered images of other classes)."""
        model = self.get_clean(seed)
        row = self.cached("none", seed, "clean")
        assert model is not None and row is not None
        floor = dict(row.get("attack_success_rate", {}))
        for attack in attacks:
            if attack not in floor:
                data, _ = self.poisoned_data(attack, seed)
                floor[attack] = make_evaluator(data, CPU)(model).get("attack_success_rate", float("nan"))
                log.info("seed %d clean model under %s: ASR %.4f", seed, attack, floor[attack])
        self.add({**row, "attack_success_rate": floor})

    def poisoned_data(self, attack: str, seed: int) -> tuple[PreparedData, ExperimentConfig]:
        params: dict[str, Any] = {}
        if attack == "label-consistent":
            params = {"model": self.get_clean(seed), "steps": self.args.lc_steps}
        cfg = self.exp_cfg(attack, seed, params)
        t0 = time.perf_counter()
        data = prepare_data(cfg)
        log.info("%s seed %d: poisoned %d images (%.0fs)", attack, seed, len(data.poison_indices),
                 time.perf_counter() - t0)
        return data, cfg

    def run_none(self, attack: str, seed: int, data: PreparedData, cfg: ExperimentConfig) -> dict[str, Any]:
        model = self.fresh_model(data, seed)
        t0 = time.perf_counter()
        train_plain(model, data.train.images, data.train.labels, cfg.train, None, quiet=True)
        secs = time.perf_counter() - t0
        return {**self.key(attack, seed, "none"), **make_evaluator(data, CPU)(model), "seconds": secs,
                "n_poisoned": int(len(data.poison_indices)), **self.end_to_end(model, data, attack, seed, "none")}

    def end_to_end(self, model: torch.nn.Module, data: PreparedData, attack: str, seed: int,
                   kind: str, kept: np.ndarray | None = None) -> dict[str, Any]:
        """``--end-to-end``: the guard (``--guard-detectors``, 1% FPR) calibrated on the first half of the clean test
        images for this model, and the residual attack success on the triggered versions of the other half — the
        fraction on which the backdoor fires (target predicted) and the guard does not flag — next to the ASR. With
        ``--guard-fit train`` the detectors fit on training images instead: ``kept`` (ABL's cleansed set) or, for no
        defence, the whole (poisoned) training set — what a user without ABL would have."""
        if not self.args.end_to_end or data.triggered is None:
            return {}
        out = {}
        for source in self.args.guard_fit.split(","):
            fit, keep = None, None
            if source == "train":  # the training images the model learned from: ABL's cleansed set
                keep = np.arange(len(data.train.labels)) if kept is None else kept
                n = min(len(keep), self.args.guard_fit_count)
                keep = np.sort(np.random.default_rng(seed).choice(keep, n, replace=False))
                fit = (data.train.images[keep], data.train.labels[keep])
            out[source] = {**guard_residual(model, data, self.args.guard_detectors,
                                            Path(self.args.work) / f"e2e_{attack}_{seed}_{kind}", fit=fit),
                           "fit_from": "test" if fit is None else
                           ("training set (poisoned)" if kept is None else "ABL's cleansed training set"),
                           "fit_poisoned": None if keep is None else int(np.isin(data.poison_indices, keep).sum())}
        first = next(iter(out.values()))
        return {"end_to_end": first, **({"end_to_end_by_fit": out} if len(out) > 1 else {})}

    def abl_config(self, cfg: ExperimentConfig, **over: Any) -> ABLConfig:
        a = self.args
        if a.abl_mode != "unlearn":  # the mode's own defaults (the library's), only T_te and p set here when given
            params = {"mode": a.abl_mode, "eval_every": 0, "isolation_epochs": a.isolation_epochs,
                      "expansion_method": a.expansion_method if a.abl_mode == "retrain" else None,
                      "expansion_scan_share": a.scan_share if a.abl_mode == "retrain" else None,
                      "expansion_scan_method": a.scan_method if a.abl_mode == "retrain" else None,
                      "expansion_scan_separation": a.scan_separation if a.abl_mode == "retrain" else None,
                      "expansion_input_separation": a.input_separation if a.abl_mode == "retrain" else None,
                      "input_scan": a.input_scan if a.abl_mode == "retrain" else None,
                      "retrain_epochs": a.retrain_epochs if a.abl_mode == "retrain" else None,
                      "restart": a.restart if a.abl_mode == "retrain" else None,
                      "expansion_capped_count_sd": a.capped_count_sd if a.abl_mode == "retrain" else None,
                      "expansion_off_label_ratio": a.off_label_ratio if a.abl_mode == "retrain" else None,
                      "expansion_scan_count_sd": a.scan_count_sd if a.abl_mode == "retrain" else None,
                      "expansion_recheck_epoch": a.recheck_epoch if a.abl_mode == "retrain" else None,
                      "expansion_recheck_scale": a.recheck_scale if a.abl_mode == "retrain" else None,
                      "expansion_recheck_passes": a.recheck_passes if a.abl_mode == "retrain" else None,
                      "expansion_recheck_min_mean": a.recheck_min_mean if a.abl_mode == "retrain" else None,
                      "expansion_recheck_method": a.recheck_method if a.abl_mode == "retrain" else None,
                      "expansion_recheck_count_sd": a.recheck_count_sd if a.abl_mode == "retrain" else None,
                      "isolation_extra_epochs": a.isolation_extra if a.abl_mode == "retrain" else None,
                      "isolation_ratio": a.isolation_ratio if a.isolation_ratio != 0.01 else None}
            abl_cfg = ABLConfig.from_train(cfg.train, {k: v for k, v in params.items() if v is not None})
            for k, v in over.items():
                setattr(abl_cfg, k, v)
            return abl_cfg
        params = {"isolation_epochs": a.isolation_epochs, "unlearning_epochs": a.unlearning_epochs,
                  "unlearning_lr": a.unlearning_lr, "lga": a.lga, "holdout": a.holdout,
                  "max_ca_drop": a.max_ca_drop, "isolation_score": a.isolation_score, "unlearning": a.unlearning,
                  "isolation_ratio": a.isolation_ratio, "unlearning_bound": a.unlearning_bound, "eval_every": 0,
                  "isolation_labels": a.isolation_labels}
        abl_cfg = ABLConfig.from_train(cfg.train, {k: v for k, v in params.items() if v is not None})
        for k, v in over.items():
            setattr(abl_cfg, k, v)
        return abl_cfg

    def run_abl(self, attack: str, seed: int, data: PreparedData, cfg: ExperimentConfig) -> dict[str, Any]:
        model = self.fresh_model(data, seed)
        abl_cfg = self.abl_config(cfg)
        res = run_abl(model, data.train.images, data.train.labels, abl_cfg, evaluate=make_evaluator(data, CPU),
                      poison_indices=data.poison_indices, quiet=True)
        rep = res.report
        iso, un = rep["isolation"], rep["unlearning"]
        final = rep["stages"]["unlearning"]
        return {
            **self.key(attack, seed, "abl"),
            **self.end_to_end(model, data, attack, seed, "abl",
                              kept=np.setdiff1d(np.arange(len(data.train.labels)), res.dropped)),
            "expansion": rep.get("expansion"), "recheck": rep.get("recheck"), "verdict": rep.get("verdict"),
            "n_removed": int(len(res.removed)),
            "history_stages": [h["stage"] for h in res.history],
            "clean_accuracy": final["clean_accuracy"], "attack_success_rate": final["attack_success_rate"],
            "seconds": rep["seconds"].get("total", float("nan")), "seconds_by_stage": rep["seconds"],
            "stages": {k: {m: v[m] for m in ("clean_accuracy", "attack_success_rate")} for k, v in
                       rep["stages"].items()},
            "isolation": {k: iso.get(k) for k in ("n_isolated", "precision", "recall", "max_recall", "auroc",
                                                  "loss_gap_log10", "isolated_majority_fraction",
                                                  "poison_loss_median", "clean_loss_median", "n_candidates",
                                                  "candidate_precision", "n_returned", "skipped")},
            "unlearning": {k: un.get(k) for k in ("epochs_run", "selected_epoch", "rejected_epochs",
                                                  "isolated_accuracy_before", "isolated_accuracy_after",
                                                  "trajectory", "guard", "residual")},
            "warnings": rep["warnings"], "n_poisoned": int(len(data.poison_indices)),
        }

    def run_isolation_only(self, attack: str, seed: int, data: PreparedData, cfg: ExperimentConfig,
                           lga: str) -> dict[str, Any]:
        model = self.fresh_model(data, seed)
        abl_cfg = self.abl_config(cfg, lga=lga, clean_epochs=0, unlearning_epochs=0)
        res = run_abl(model, data.train.images, data.train.labels, abl_cfg, evaluate=None,
                      poison_indices=data.poison_indices, quiet=True)
        iso = res.report["isolation"]
        return {**self.key(attack, seed, f"isolation-{lga}"), "by_score": by_ranking(res, data, abl_cfg),
                **{k: iso.get(k) for k in ("n_isolated", "loss_gap_log10", "poison_loss_median",
                                           "clean_loss_median")},
                "seconds": res.report["seconds"].get("isolation", float("nan"))}


    def run_unlearning_sweep(self, attack: str, seed: int, data: PreparedData, cfg: ExperimentConfig,
                             variants: list[tuple[str, str, float, str, float]]) -> dict[str, Any]:
        """One isolation + clean stage, then unlearning from that same model with each (objective, BN mode, lr,
        ascent term, bound), unguarded: test CA / ASR and the guard's held-out quantities after every epoch."""
        model = self.fresh_model(data, seed)
        abl_cfg = self.abl_config(cfg, unlearning_epochs=0)
        evaluate = make_evaluator(data, CPU)
        res = run_abl(model, data.train.images, data.train.labels, abl_cfg, evaluate=evaluate,
                      poison_indices=data.poison_indices, quiet=True)
        base = copy.deepcopy(model.state_dict())
        iso_x, iso_y = data.train.images[res.isolated], data.train.labels[res.isolated]
        hold_x, hold_y = data.train.images[res.holdout], data.train.labels[res.holdout]
        target = res.report["isolation"]["isolated_majority_label"]
        out = {}
        rest = np.setdiff1d(np.setdiff1d(np.arange(len(data.train.labels)), res.holdout), res.isolated)
        for mode, bn, lr, ascent, bound in variants:
            model.load_state_dict(base)
            opt = make_optimizer(model, lr, abl_cfg.momentum, abl_cfg.weight_decay)
            batches = ArrayBatches(iso_x, iso_y, CPU, abl_cfg.batch_size, seed=seed + 2)
            clean = (cycle_batches(ArrayBatches(data.train.images, data.train.labels, CPU, abl_cfg.batch_size,
                                                seed=seed + 3, indices=rest)) if mode == "joint" else None)
            traj = []
            for _ in range(self.args.unlearning_epochs):
                unlearning_epoch(model, batches, opt, bn, clean=clean, bound=bound, ascent=ascent)
                traj.append({**evaluate(model), **guard_metrics(model, hold_x, hold_y, target, CPU)})
            out[f"{mode} {ascent} bound {bound:g} {bn}@{lr:g}"] = traj
        return {**self.key(attack, seed, "unlearning-sweep"), "precision": res.report["isolation"]["precision"],
                "by_score": by_ranking(res, data, abl_cfg), "before": res.report["stages"]["clean"],
                "variants": out}


def guard_residual(model: torch.nn.Module, data: PreparedData, detectors: str, work: Path,
                   fpr: float = 0.01, fit: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Export ``model``, calibrate a guard at ``fpr`` on the first half of the clean test images, and measure the
    triggered test images built from the other half: ASR, flagged share and residual (backdoor fires, guard silent)."""
    from detect import export

    from abl_guard.detectors import make_detectors
    from abl_guard.guard.build import calibrate_bundle
    from abl_guard.guard.runtime import Guard

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    n_cal = len(data.test.labels) // 2
    onnx_path = export(model, data.train.spec, work / "model.onnx")
    names = [n for n in detectors.split(",") if n]
    calibrate_bundle(onnx_path, data.test.images[:n_cal], data.test.labels[:n_cal],
                     make_detectors(detectors), work / "bundle", fpr=fpr, overwrite=True,
                     fit_images=None if fit is None else fit[0], fit_labels=None if fit is None else fit[1])
    guard = Guard.load(work / "bundle")
    trig = data.triggered
    held = trig.indices >= n_cal
    pred, flag = guard.predict(trig.images[held])
    fires = pred == trig.labels[held]
    _, clean_flag = guard.predict(data.test.images[n_cal:])
    return {"detectors": names, "fpr_target": fpr, "n_calibration": n_cal, "n_triggered": int(held.sum()),
            "asr": float(fires.mean()), "flagged_triggered": float(flag.mean()),
            "residual": float((fires & ~flag).mean()), "clean_flagged": float(clean_flag.mean()),
            "seconds": time.perf_counter() - t0}


def by_ranking(res: Any, data: PreparedData, abl_cfg: ABLConfig) -> dict[str, dict[str, Any]]:
    """The isolation statistics of every ranking in :data:`RANKINGS` on the same per-example losses of one run."""
    out = {}
    cfg = copy.copy(abl_cfg)
    pool = np.setdiff1d(np.arange(len(data.train.labels)), res.holdout)
    for name, score, ref in RANKINGS:
        scores = np.full(len(res.losses), np.nan)
        scores[pool] = isolation_scores(res.losses[pool], data.train.labels[pool], score, ref)
        cfg.isolation_score, cfg.isolation_reference = score, ref
        iso = isolation_report(res.losses, pool[isolate_lowest(scores[pool], cfg.isolation_ratio)],
                               data.train.labels, pool, data.poison_indices, cfg, scores)
        out[name] = {k: iso.get(k) for k in ("n_isolated", "precision", "recall", "max_recall", "auroc",
                                             "score_gap_log10", "isolated_majority_fraction")}
    return out


def mean_std(values: list[float], scale: float = 100.0) -> str:
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], np.float64) * scale
    if len(v) == 0:
        return "—"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def lr_steps(args: argparse.Namespace) -> str:
    m = milestones_of(args)
    return f", divided by 10 at epoch{'s' if len(m) > 1 else ''} {', '.join(map(str, m))}" if m else ""


def write_markdown(bench: Bench, attacks: list[str], seeds: list[int], path: Path) -> None:
    a = bench.args
    rows = [r for r in bench.rows if r.get("settings") == bench.key(r["attack"], r["seed"], r["kind"])["settings"]]
    pick = lambda attack, kind: [r for r in rows if r["attack"] == attack and r["kind"] == kind  # noqa: E731
                                 and r["seed"] in seeds]
    clean = pick("none", "clean")
    lines = [
        "# Anti-Backdoor Learning on Fashion-MNIST",
        "",
        f"`{command_line()}` — {cpu_name()}, {a.threads} thread(s), "
        f"torch {torch.__version__}. Seeds {seeds}; mean ± std over seeds (sample std).",
        "",
        f"Setting: Fashion-MNIST, {a.train_limit or 60000} random training images (poisoned at rate {a.rate}, "
        f"target 0, each attack's defaults), the full test set{'' if not a.test_limit else f' ({a.test_limit})'}; "
        f"small-cnn, SGD lr {a.lr}{lr_steps(a)} (Nesterov momentum 0.9, weight decay 5e-4, batch 128). No defence "
        f"and the clean model: {a.epochs} epochs. " + (
            f"ABL --abl-mode {a.abl_mode} with the library's defaults for that mode (retrain: isolation of at most "
            f"T_te = {a.isolation_epochs or max(1, round(0.2 * a.epochs))} epochs, stopped once the isolated set is "
            "concentrated and its seed expands to a separate population; p = 1% ranked by the class-relative score, "
            "majority label kept; seed expansion; a fresh model trained the full T on the rest"
            + RESTART_SETTING[a.restart]
            + (f"; a capped expansion no scan confirmed kept only with a held-out count excess of its label of "
               f"{a.capped_count_sd:g} sd or more" if a.capped_count_sd else "")
            + (f"; after the fresh model's clean {recheck_epochs(a)}, the removed label's examples it gives "
               f"less than {a.recheck_scale:g} × the label's mean probability removed too (the clean-stage recheck; "
               f"a pass skipped when that mean is under {a.recheck_min_mean:g})"
               if a.recheck_epoch and a.recheck_method == "confidence" else "")
            + (f"; after the fresh model's clean epoch {a.recheck_epoch}, the removed label's examples a "
               "pixel-space CNN trained on nine tenths of the removal flags above the 98% quantile of held-out "
               "other labels (99.5% when its positives are the whole removal) removed too, unless it recalls "
               "under half of the last tenth"
               + (f", and, when the label still holds {a.recheck_count_sd:g} sd or more examples over the median "
                  "label, that many of its examples the fresh model places least surely in it (the count top-up)"
                  if a.recheck_count_sd else "")
               + " (the pixel recheck"
               + ("; then, when it flagged any, the clean stage again from fresh weights"
                  if a.recheck_method == "pixel-restart" else "") + ")"
               if a.recheck_epoch and a.recheck_method.startswith("pixel") else "")
            + "; no unlearning). "
            "The unlearning columns below do not apply to it." if a.abl_mode != "unlearn" else "") + (
        f"ABL: T = {a.epochs} epochs = isolation T_te = "
        f"{a.isolation_epochs or max(1, round(0.2 * a.epochs))} ({a.lga} LGA, gamma 0.5) + clean stage, isolation "
        f"ratio p = {a.isolation_ratio:.0%} ranked by the {a.isolation_score} score"
        f"{', only its majority label unlearned' if a.isolation_labels == 'target' else ''}, "
        f"then {a.unlearning_epochs} {a.unlearning} unlearning epochs at lr {a.unlearning_lr} (ascent bound "
        f"{a.unlearning_bound or 'none'}); guard: {a.holdout:.0%} held-out training split, max CA drop "
        f"{a.max_ca_drop}, keeps the best passing epoch. A scaled-down paper schedule "
        "(paper: 100 epochs = 20 + 80, then unlearning; WRN-16-1 on CIFAR-10)." if a.abl_mode == "unlearn" else ""),
        "",
        f"CA of a model trained on clean data only: **{mean_std([r['clean_accuracy'] for r in clean])}%** "
        f"(n = {len(clean)}).",
        "",
        "| attack | seeds (none / ABL) | n poisoned | no defence CA % | no defence ASR % | ABL CA % | ABL ASR % "
        "| ABL ASR before unlearning % | isolation precision % | isolation recall % (max) "
        "| AUROC of the ranking | unlearning epoch kept (of N) "
        "| ABL total / its training epochs (same run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for attack in attacks:
        none, abl = pick(attack, "none"), pick(attack, "abl")
        if not none and not abl:
            continue
        iso = [r["isolation"] for r in abl]
        # ABL's overhead over the same number of plain training epochs, timed inside one run (isolation + clean
        # stage epochs are ordinary training epochs; the rest is the loss ranking, unlearning and its guard)
        ratio = [f"{t['total'] / (t.get('isolation', 0.0) + t['clean']):.2f}"
                 for t in (r["seconds_by_stage"] for r in sorted(abl, key=lambda r: r["seed"]))]
        kept = [str(r["unlearning"].get("selected_epoch", "?")) for r in sorted(abl, key=lambda r: r["seed"])]
        n_un = abl[0]["unlearning"]["epochs_run"] if abl else 0
        lines.append(
            f"| {attack} | {len(none)} / {len(abl)} | {none[0]['n_poisoned'] if none else abl[0]['n_poisoned']} "
            f"| {mean_std([r['clean_accuracy'] for r in none])} | {mean_std([r['attack_success_rate'] for r in none])} "
            f"| {mean_std([r['clean_accuracy'] for r in abl])} | {mean_std([r['attack_success_rate'] for r in abl])} "
            f"| {mean_std([r['stages']['clean']['attack_success_rate'] for r in abl])} "
            f"| {mean_std([i['precision'] for i in iso])} | {mean_std([i['recall'] for i in iso])} "
            f"({mean_std([i['max_recall'] for i in iso])}) | {mean_std([i['auroc'] for i in iso], 1.0)} "
            f"| {', '.join(kept)} (of {n_un}) "
            f"| {', '.join(ratio) if ratio else '—'} |")
    lines += ["", "Per run (CA / ASR % after each ABL stage; guard = held-out non-target accuracy and "
              "target-prediction rate / estimated accuracy before → after unlearning; ✗ = epoch rejected by the guard; "
              "warnings raised by the run):", ""]
    for attack in attacks:
        for r in sorted(pick(attack, "abl"), key=lambda r: r["seed"]):
            st = r["stages"]
            g = r["unlearning"]["guard"]
            stage_txt = " → ".join(f"{k} {100 * v['clean_accuracy']:.1f}/{100 * v['attack_success_rate']:.1f}"
                                   for k, v in st.items())
            guard_txt = " → ".join(f"{100 * x['nontarget_accuracy']:.1f}% / {100 * x['target_rate']:.1f}% / "
                                   f"{100 * x['estimated_accuracy']:.1f}%" for x in (g["baseline"], g["final"]))
            rejected = r["unlearning"].get("rejected_epochs")
            traj = " ".join(f"{100 * t['clean_accuracy']:.1f}/{100 * t['attack_success_rate']:.1f}"
                            + ("✗" if t.get("guard_rejected") else "") for t in r["unlearning"]["trajectory"])
            lines.append(f"- {attack} seed {r['seed']}: {stage_txt}; precision "
                         f"{100 * r['isolation']['precision']:.1f}%; unlearning epochs {traj} → kept epoch "
                         f"{r['unlearning'].get('selected_epoch')}; guard {guard_txt}"
                         f"{f'; rejected epochs {rejected}' if rejected else ''}; {len(r['warnings'])} warning(s)"
                         + (f": {'; '.join(w.split(':')[0] for w in r['warnings'])}" if r["warnings"] else ""))
    lines += retrain_lines(rows, attacks, seeds) + end_to_end_lines(rows, attacks, seeds)
    iso_rows = [r for r in rows if r["kind"].startswith("isolation-")]  # every seed measured with these settings
    attacks = attacks + sorted({r["attack"] for r in iso_rows} - set(attacks))
    if iso_rows:
        lines += ["", f"## Isolation: LGA form x ranking score, after T_te = "
                  f"{a.isolation_epochs or max(1, round(0.2 * a.epochs))} epochs (isolation stage only)", "",
                  "The scores rank the same per-example losses of one isolation run: `loss` is the paper's raw loss, "
                  "`class-relative` the log-loss minus the median log-loss of the example's own label, "
                  "`class-relative@0.75` minus its 75th percentile.", "",
                  "| attack | LGA form | score | precision % | precision % per seed | recall % | AUROC "
                  "| poison / clean median loss | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for attack in attacks:
            for form in ("flooding", "per-example"):
                rs = [r for r in iso_rows if r["attack"] == attack and r["kind"] == f"isolation-{form}"
                      and "by_score" in r]
                if not rs:
                    continue
                rs = sorted(rs, key=lambda r: r["seed"])
                med = (f"{np.median([r['poison_loss_median'] for r in rs]):.2e} / "
                       f"{np.median([r['clean_loss_median'] for r in rs]):.2e}")
                for score in [name for name, _, _ in RANKINGS if all(name in r["by_score"] for r in rs)]:
                    ss = [r["by_score"][score] for r in rs]
                    per_seed = " ".join(f"{100 * x['precision']:.0f}" for x in ss)
                    lines.append(f"| {attack} | {form} | {score} | {mean_std([x['precision'] for x in ss])} "
                                 f"| {per_seed} | {mean_std([x['recall'] for x in ss])} "
                                 f"| {mean_std([x['auroc'] for x in ss], 1.0)} | {med} | {len(rs)} |")
    sweep_rows = [r for r in rows if r["kind"] == "unlearning-sweep"]
    if sweep_rows:
        lines += ["", "## Unlearning without the guard: test CA / ASR % after each unlearning epoch", "",
                  "One isolation + clean stage, then unguarded unlearning of the isolated set; in brackets the guard's "
                  "held-out non-target accuracy / target-prediction rate %. Seed column: isolation precision % "
                  f"[of the rankings {', '.join(n for n, _, _ in RANKINGS)} on the same losses, where recorded].",
                  ""]
        for attack in sorted({r["attack"] for r in sweep_rows}):
            rs = sorted((r for r in sweep_rows if r["attack"] == attack), key=lambda r: r["seed"])
            lines += [f"{attack}:", "",
                      "| seed (isolation precision %; CA / ASR before) | variant (objective, ascent, bound, BN @ lr) | "
                      + " | ".join(f"epoch {i + 1}" for i in range(a.unlearning_epochs)) + " |",
                      "|---|---" + "|---" * a.unlearning_epochs + "|"]
            for r in rs:
                ranks = "/".join(f"{100 * v['precision']:.0f}" for v in r.get("by_score", {}).values())
                head = (f"{r['seed']} ({100 * r['precision']:.0f}{' [' + ranks + ']' if ranks else ''}; "
                        f"{100 * r['before']['clean_accuracy']:.1f} / {100 * r['before']['attack_success_rate']:.1f})")
                for name, traj in r["variants"].items():
                    cells = [f"{100 * p['clean_accuracy']:.1f} / {100 * p['attack_success_rate']:.1f} "
                             f"({100 * p['nontarget_accuracy']:.1f} / {100 * p['target_rate']:.1f})" for p in traj]
                    lines.append(f"| {head} | {name} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["", "GPU run (PreAct-ResNet-18, Fashion-MNIST padded to 32×32, the full 100-epoch paper schedule): "
              "`bench/abl_gpu.py`, results in `abl_gpu.md`.", ""]
    write_markdown_keeping_notes(f"{path}.md", "\n".join(lines))


def stored_report(r: dict[str, Any]) -> dict[str, Any]:
    """A stored run's report fields as ``report.verdict`` reads them; reports stored before the expansion recorded its
    pool size get it back from the isolation's candidates (the isolation ratio of the pool)."""
    cfg = ABLConfig.for_mode("retrain")
    iso = {**r["isolation"], "isolated_majority_label": r["expansion"].get("target"),
           "epoch": r["history_stages"].count("isolation"), "skipped": isolation_skipped(r)}
    exp = dict(r["expansion"])
    if "n_pool" not in exp and iso.get("n_candidates"):
        exp["n_pool"] = round(iso["n_candidates"] / cfg.isolation_ratio)
    return {"isolation": iso, "expansion": exp, "unlearning": r["unlearning"]}


def isolation_skipped(r: dict[str, Any]) -> bool:
    """Whether a stored run skipped its isolation epochs (the input scan found the poison first); runs stored before
    the flag was recorded: no isolation epoch and the input scan's find."""
    flag = r["isolation"].get("skipped")
    if flag is not None:
        return bool(flag)
    return r["history_stages"].count("isolation") == 0 and found_by_input_scan(r["expansion"])


def seed_cells(r: dict[str, Any], fmt: str = ".0f", unit: str = "%") -> str:
    """The T_te and isolated-seed cells of a retrain-mode row; a skipped isolation (the input scan found the poison
    first) has neither."""
    iso = r["isolation"]
    if isolation_skipped(r):
        return "0 (skipped) | —"
    return (f"{r['history_stages'].count('isolation')} | {iso['n_isolated']} "
            f"({format(100 * iso['precision'], fmt)}{unit})")


def row_verdict(r: dict[str, Any]) -> dict[str, Any]:
    """The verdict the current ``report.verdict`` gives on a stored run's report fields (so that a table rendered
    later uses the current rule; the verdict recorded at run time stays in the JSON under ``verdict``)."""
    from abl_guard.abl.report import verdict

    return verdict(stored_report(r), ABLConfig.for_mode("retrain"))


def time_ratio(r: dict[str, Any]) -> float:
    """ABL's total time over plain training for the same schedule, timed inside the run: its clean stage's time per
    example-epoch times the whole training set times ``--epochs`` stands for plain training (the clean stage is a
    whole schedule, or with ``--retrain-epochs remaining`` what the isolation left of it). Plain training sees every
    training image, the clean stage only the pool minus what ABL removed (and not the held-out split), so its time
    per epoch alone understates plain training by the removed share: runs before 2026-12-03 reported that ratio
    (:func:`time_ratio_per_epoch`), up to 12% higher."""
    sizes = clean_stage_sizes(r)
    ratio = time_ratio_per_epoch(r)
    return ratio if sizes is None else ratio * sizes[0] / sizes[1]


def time_ratio_per_epoch(r: dict[str, Any]) -> float:
    """The ratio with the clean stage's time per *epoch* standing for plain training's (the record before
    2026-12-03)."""
    t = r["seconds_by_stage"]
    n_clean = r["history_stages"].count("clean") or r["settings"]["epochs"]
    return t["total"] / (t["clean"] * r["settings"]["epochs"] / n_clean)


def clean_stage_sizes(r: dict[str, Any]) -> tuple[int, int] | None:
    """``(examples the clean stage trained on, training images)`` of a retrain-mode run, from its record (the pool
    minus what was removed; the pool plus the held-out split); None when the record does not say."""
    exp, guard = r.get("expansion") or {}, (r.get("unlearning") or {}).get("guard") or {}
    pool, held, removed = exp.get("n_pool"), guard.get("n_holdout"), r.get("n_removed")
    if not pool or held is None or removed is None or removed >= pool:
        return None
    return int(pool - removed), int(pool + held)


def verdict_cell(r: dict[str, Any]) -> str:
    """A stored run's current verdict with its held-out probe in brackets (— when it cannot tell)."""
    v = row_verdict(r)
    held = v["held_out_probe"]
    return f"{v['status']} ({'—' if held is None else f'{held:.2f}'})"


def retrain_lines(rows: list[dict[str, Any]], attacks: list[str], seeds: list[int]) -> list[str]:
    """Retrain mode: what the isolation stopped at, what the expansion removed, and the run's own verdict."""
    abl = [r for r in rows if r["kind"] == "abl" and r.get("expansion") is not None and r["seed"] in seeds]
    if not abl:
        return []
    out = ["", "## Retrain mode: isolation, seed expansion, verdict", "",
           "T_te = isolation epochs run (auto stop); seed = isolated examples of the majority label (precision %); "
           "removed = seed + expansion (+ the clean-stage recheck when on: missed and clean removed count it too); "
           "poison recall % of the seed + expansion, poison missed, clean removed; "
           "time = ABL total / plain training, its clean stage's time per example-epoch × every training image × "
           "--epochs, in the same run; "
           "verdict: `report.verdict` of the current code on the run's stored report (the held-out probe in "
           "brackets).", "",
           "| attack | seed | T_te | seed (precision %) | removed | poison recall % | missed | clean removed "
           "| separation | verdict | CA % | ASR % | time |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack in attacks:
        for r in sorted((r for r in abl if r["attack"] == attack), key=lambda r: r["seed"]):
            e = r["expansion"]
            sep = e.get("mixture", {}).get("separation", float("nan"))
            missed, clean = e.get("missed_poison", "—"), e.get("removed_clean", "—")
            rec = r.get("recheck") or {}
            if "removed_poison" in rec and isinstance(missed, int) and isinstance(clean, int):
                missed, clean = missed - rec["removed_poison"], clean + rec["removed_clean"]
            out.append(f"| {attack} | {r['seed']} | {seed_cells(r, '.1f', '')} | {r['n_removed']} "
                       f"| {100 * e.get('recall', float('nan')):.2f} | {missed} "
                       f"| {clean} | {sep:.1f} | {verdict_cell(r)} "
                       f"| {100 * r['clean_accuracy']:.2f} | {100 * r['attack_success_rate']:.2f} "
                       f"| {time_ratio(r):.2f} |")
    return out


def fit_note(have: list[dict[str, Any]]) -> str:
    """Where the end-to-end guards' detectors were fitted, when not on the test half (``--guard-fit train``)."""
    fits = sorted({(r["kind"], r["end_to_end"].get("fit_from", "test"), r["end_to_end"].get("fit_poisoned"))
                   for r in have if r["end_to_end"].get("fit_from", "test") != "test"})
    if not fits:
        return ""
    return " Detectors fitted on training images: " + "; ".join(
        f"{kind}: {src}, {poisoned} poisoned images in it" for kind, src, poisoned in fits) + "."


def end_to_end_lines(rows: list[dict[str, Any]], attacks: list[str], seeds: list[int]) -> list[str]:
    """The residual attack success through the whole system: no defence, guard only, ABL only, ABL + guard."""
    have = [r for r in rows if "end_to_end" in r and r["seed"] in seeds]
    if not have:
        return []
    sets = {kind: sorted({",".join(r["end_to_end"]["detectors"]) for r in have if r["kind"] == kind})
            for kind in ("none", "abl")}
    det = " / ".join(f"`{d}`" for d in sorted(set(sets["none"] + sets["abl"])))
    if sets["none"] and sets["abl"] and sets["none"] != sets["abl"]:  # stored runs from before the check
        det = (" / ".join(f"`{d}`" for d in sets["none"]) + " for the no-defence model (guard only), "
               + " / ".join(f"`{d}`" for d in sets["abl"]) + " for ABL's (ABL + guard)")
    out = ["", "## End to end: residual attack success %", "",
           f"Triggered test images (the second half of the test set, source class not the target) on which the "
           f"backdoor fires (the model predicts the target) and the guard ({det}, calibrated at 1% FPR on the "
           "first half's clean images, for the same model) does not flag. Mean ± std over seeds; clean flagged % = "
           "the guard's false-positive rate on the second half's clean images."
           + fit_note(have), "",
           "| attack | seeds | no defence (ASR) | guard only | ABL only (ASR) | ABL + guard | clean flagged % "
           "(none / ABL) |", "|---|---|---|---|---|---|---|"]
    for attack in attacks:
        none = [r["end_to_end"] for r in have if r["attack"] == attack and r["kind"] == "none"]
        abl = [r["end_to_end"] for r in have if r["attack"] == attack and r["kind"] == "abl"]
        if none or abl:
            out.append(e2e_row([attack, f"{len(none)} / {len(abl)}"], none, abl))
    by_fit = [r for r in have if "end_to_end_by_fit" in r]
    if by_fit:
        out += ["", "The same models with the guard's detectors fitted on each source (`--guard-fit`); poisoned = "
                "poisoned images in the fit set:", "",
                "| attack | fit on | poisoned in fit (none / ABL) | no defence (ASR) | guard only | ABL only (ASR) "
                "| ABL + guard | clean flagged % (none / ABL) |", "|---|---|---|---|---|---|---|---|"]
        for attack in attacks:
            for source in by_fit[0]["end_to_end_by_fit"]:
                none = [r["end_to_end_by_fit"][source] for r in by_fit if r["attack"] == attack and r["kind"] == "none"]
                abl = [r["end_to_end_by_fit"][source] for r in by_fit if r["attack"] == attack and r["kind"] == "abl"]
                if none or abl:
                    poisoned = " / ".join("–" if not e or e[0]["fit_poisoned"] is None else str(e[0]["fit_poisoned"])
                                         for e in (none, abl))
                    out.append(e2e_row([attack, source, poisoned], none, abl))
    return out


def e2e_row(lead: list[str], none: list[dict[str, Any]], abl: list[dict[str, Any]]) -> str:
    """One end-to-end table row: the ``lead`` cells, then ASR and residual without and with ABL, clean flagged
    share."""
    return (f"| {' | '.join(lead)} | {mean_std([e['asr'] for e in none])} "
            f"| {mean_std([e['residual'] for e in none])} | {mean_std([e['asr'] for e in abl])} "
            f"| {mean_std([e['residual'] for e in abl])} | {mean_std([e['clean_flagged'] for e in none])} / "
            f"{mean_std([e['clean_flagged'] for e in abl])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default=None, help="comma-separated (default: every registered backdoor attack)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-limit", type=int, default=20000, help="0 = all 60,000 training images")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=10, help="T: no-defence epochs = ABL isolation + clean stage")
    ap.add_argument("--isolation-epochs", type=int, default=None, help="T_te (default 20%% of --epochs)")
    ap.add_argument("--unlearning-epochs", type=int, default=5)
    ap.add_argument("--unlearning-lr", type=float, default=5e-4)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--lr-milestones", default="",
                    help="comma-separated epochs where the lr is divided by 10 (all runs; ABL's isolation and clean "
                         "stage share the schedule); default: a constant lr")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--lga", default="flooding", choices=["flooding", "per-example"])
    ap.add_argument("--isolation-ratio", type=float, default=0.01, help="p (the paper's 1%%)")
    ap.add_argument("--isolation-score", default="class-relative", choices=list(ISOLATION_SCORES))
    ap.add_argument("--isolation-labels", default="all", choices=list(ISOLATION_LABELS))
    ap.add_argument("--unlearning", default="joint", choices=["joint", "ascent"])
    ap.add_argument("--unlearning-bound", type=float, default=5.0, help="0 = unbounded ascent (the paper)")
    ap.add_argument("--baselines", default=None,
                    help="ABL runs only: take the no-defence / clean-data runs from this results JSON (e.g. one "
                         "written by a concurrent run of this script with other ABL settings)")
    ap.add_argument("--holdout", type=float, default=0.02)
    ap.add_argument("--max-ca-drop", type=float, default=0.02)
    ap.add_argument("--lc-steps", type=int, default=20, help="PGD steps of label-consistent (attack default 100)")
    ap.add_argument("--lga-compare", action="store_true",
                    help="isolation-only runs, both LGA forms x both ranking scores")
    ap.add_argument("--lga-forms", default="flooding,per-example", help="the LGA forms --lga-compare runs")
    ap.add_argument("--unlearning-sweep", action="store_true",
                    help="unguarded unlearning from one clean-stage model with several BN modes / learning rates")
    ap.add_argument("--sweep-variants", default=None,
                    help="--unlearning-sweep variants, comma-separated objective:bn:lr:ascent:bound (e.g. "
                         "joint:frozen:5e-4:negated-ce:5); default: the committed sweep's")
    ap.add_argument("--merge", default=None,
                    help="comma-separated results JSONs whose runs are added to this one (concurrent processes)")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: rewrite the markdown from the runs already in the JSON (seeds not run are left "
                         "out of the means; the table says how many seeds each row has)")
    ap.add_argument("--quick", action="store_true", help="smoke run: BadNets, 1 seed, 3,000 images, 3 epochs")
    ap.add_argument("--abl-mode", default="retrain", choices=["retrain", "unlearn", "paper"],
                    help="ABL's mode (the library default retrain; 'unlearn' keeps the other options' meaning here)")
    ap.add_argument("--expansion-method", default="spectral", choices=list(EXPANSION_METHODS),
                    help="retrain mode's seed expansion (abl/expansion.py)")
    ap.add_argument("--scan-share", type=float, default=ABLConfig.expansion_scan_share,
                    help="retrain mode's label scan when the seed does not expand (0 = off; abl/expansion.py)")
    ap.add_argument("--scan-method", default=ABLConfig.expansion_scan_method, choices=list(SCAN_METHODS),
                    help="retrain mode's label scan: spectral (Tran et al.) or contrastive (abl/expansion.py)")
    ap.add_argument("--scan-separation", type=float, default=ABLConfig.expansion_scan_separation,
                    help="retrain mode's contrastive scan: also take a label split this far apart (0 = off)")
    ap.add_argument("--input-separation", type=float, default=ABLConfig.expansion_input_separation,
                    help="retrain mode: scan every label's raw inputs first and take a split this far apart (0 = off)")
    ap.add_argument("--input-scan", default=ABLConfig.input_scan, choices=list(INPUT_SCAN_ORDERS),
                    help="retrain mode: the input scan before the isolation epochs (a find skips them) or after them")
    ap.add_argument("--retrain-epochs", default=ABLConfig.retrain_epochs, choices=list(RETRAIN_SCHEDULES),
                    help="retrain mode's clean stage: a whole schedule, or --epochs minus the isolation epochs run")
    ap.add_argument("--restart", default=ABLConfig.restart, choices=list(RESTARTS),
                    help="retrain mode: a fresh model only after a find (found), every time (always) or never "
                         "(the isolation model continues)")
    ap.add_argument("--capped-count-sd", type=float, default=ABLConfig.expansion_capped_count_sd,
                    help="retrain mode: keep an unconfirmed capped expansion only with this held-out count excess "
                         "(sd; 0 = off, as before 2026-12-03)")
    ap.add_argument("--scan-count-sd", type=float, default=ABLConfig.expansion_scan_count_sd,
                    help="retrain mode's contrastive scan: also take a label whose split matches its count excess of "
                         "this many sd (0 = off, as before 2026-12-04)")
    ap.add_argument("--recheck-epoch", type=int, default=ABLConfig.expansion_recheck_epoch,
                    help="retrain mode: the fresh model's clean-stage epoch after which the removed label is "
                         "rechecked for poison the removal missed (0 = off; 1, the library's default since "
                         "2026-12-05)")
    ap.add_argument("--recheck-method", default=ABLConfig.expansion_recheck_method, choices=RECHECK_METHODS,
                    help="the recheck's rule: pixel-restart (the library's default), pixel (a pixel-space CNN "
                         "trained on the removal; the model continues) or confidence (the label's mean probability)")
    ap.add_argument("--recheck-count-sd", type=float, default=ABLConfig.expansion_recheck_count_sd,
                    help="the pixel recheck's count top-up: the label's excess over the median label, in sd, that "
                         "removes that many of its least surely placed examples too (0 = off)")
    ap.add_argument("--recheck-scale", type=float, default=ABLConfig.expansion_recheck_scale,
                    help="the recheck's threshold as a multiple of the label's mean probability")
    ap.add_argument("--recheck-passes", type=int, default=ABLConfig.expansion_recheck_passes,
                    help="the recheck's passes, one after each epoch from --recheck-epoch on")
    ap.add_argument("--recheck-min-mean", type=float, default=ABLConfig.expansion_recheck_min_mean,
                    help="skip a recheck pass when the label's mean probability is under this")
    ap.add_argument("--off-label-ratio", type=float, default=ABLConfig.expansion_off_label_ratio,
                    help="retrain mode: the off-label scan's floor ratio when nothing else was found (0 = off, as "
                         "before 2026-12-03)")
    ap.add_argument("--isolation-extra", type=int, default=ABLConfig.isolation_extra_epochs,
                    help="retrain mode: extra isolation epochs when nothing separate was found by T_te (0 = off)")
    ap.add_argument("--end-to-end", action="store_true",
                    help="also calibrate a guard on each model and report the residual attack success through it")
    ap.add_argument("--guard-detectors", default=None,
                    help="the guard of --end-to-end (default: calibrate's default detectors)")
    ap.add_argument("--guard-fit", default="test",
                    help="what the --end-to-end guard's detectors fit on: test (part of the first half of the test "
                         "set) or train (ABL: its cleansed set; no defence: the poisoned training set); test,train "
                         "measures both on the same models, the first in the main table")
    ap.add_argument("--guard-fit-count", type=int, default=10000, help="training images of --guard-fit train")
    ap.add_argument("--skip-clean", action="store_true", help="do not train the clean-data reference model")
    ap.add_argument("--clean-only", action="store_true",
                    help="only the clean-data model of each seed, with its ASR under every --attacks trigger (the "
                         "floor an ABL model's ASR is compared with)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="ignore cached runs in the JSON")
    ap.add_argument("--out", default=None, help="results path without suffix (default bench/results/abl)")
    ap.add_argument("--work", default="/tmp/abl-bench", help="where the clean-data models are kept between runs")
    args = ap.parse_args()
    if args.quick:
        args.attacks = args.attacks or "badnets"
        args.seeds, args.train_limit, args.test_limit, args.epochs = "0", 3000, 2000, 3
        args.out = args.out or str(ROOT / "bench" / "results" / "abl_quick")
    args.out = args.out or str(ROOT / "bench" / "results" / "abl")
    if args.end_to_end and not args.guard_detectors:
        from abl_guard.cli import calibrate

        args.guard_detectors = next(p.default for p in calibrate.params if p.name == "detector_names")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("abl_guard.abl", "abl_guard.attacks", "abl_guard.export", "abl_guard.guard", "onnxscript",
                  "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    attacks = args.attacks.split(",") if args.attacks else sorted(REGISTRY)
    unknown = [x for x in attacks if x not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; registered: {sorted(REGISTRY)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = sweep_variants(args.sweep_variants)  # parsed before any run, so a bad spec fails at once
    bench = Bench(args)
    for other in filter(None, (args.merge or "").split(",")):
        log.info("merged %d run(s) from %s", bench.merge(other), other)
    if args.clean_only and not args.render:
        for seed in seeds:
            bench.clean_floor(seed, attacks)
        bench.save()
        return
    for seed in [] if args.render else seeds:  # seed-major, so that the first seed of every attack lands first
        if args.baselines:
            bench.load_baselines()
        if (bench.cached("none", seed, "clean") is None and not (args.lga_compare or args.unlearning_sweep)
                and not args.baselines and not args.skip_clean):
            bench.get_clean(seed)
        for attack in attacks:
            if args.baselines:
                bench.load_baselines()
            kinds = ([f"isolation-{f}" for f in args.lga_forms.split(",")] if args.lga_compare
                     else ["unlearning-sweep"] if args.unlearning_sweep else
                     ["abl"] if args.baselines else ["abl", "none"])
            todo = [k for k in kinds if bench.cached(attack, seed, k) is None]
            if not todo:
                continue
            data, cfg = bench.poisoned_data(attack, seed)
            for kind in todo:
                torch.set_num_threads(args.threads)
                if kind == "none":
                    row = bench.run_none(attack, seed, data, cfg)
                elif kind == "abl":
                    row = bench.run_abl(attack, seed, data, cfg)
                elif kind == "unlearning-sweep":
                    row = bench.run_unlearning_sweep(attack, seed, data, cfg, variants)
                else:
                    row = bench.run_isolation_only(attack, seed, data, cfg, kind.split("-", 1)[1])
                bench.add(row)
                log.info("%s seed %d %s: %s", attack, seed, kind,
                         {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
            write_markdown(bench, attacks, seeds, Path(args.out))
    if args.baselines:
        bench.load_baselines()
    bench.save()
    write_markdown(bench, attacks, seeds, Path(args.out))
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()

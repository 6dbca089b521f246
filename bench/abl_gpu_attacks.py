"""The six attacks at the paper's setting on one GPU: ABL's default (retrain) mode and its paper mode, side by side.

Issue 17's GPU item: PreAct-ResNet-18, T = 100 epochs (SGD lr 0.1, / 10 at 20 and 70, batch 128, crop + flip),
Fashion-MNIST padded to 32×32, BadNets / Blend / Trojan / WaNet at 10% and SIG / label-consistent at 5% (half of the
target class, so that it is not wholly poisoned), target 0, one seed. Every job is its own process, all started
together on the one GPU (a lease is 15 minutes; one process at a time leaves the card mostly idle at this model size):

* ``ATTACK:retrain`` — the library's default ABL (``mode="retrain"``): the input scan, isolation when needed, the
  expansion and a fresh model trained for the whole schedule on what is left; the verdict of its report.
* ``ATTACK:paper`` — ``mode="paper"``: every ABL default the paper's (T_te = 20, p = 1%, raw-loss ranking, 80 clean
  epochs, 5 unbounded-ascent unlearning epochs at lr 5e-4). Its model *before* unlearning (trained on 99% of the
  poisoned set for the whole schedule) is the per-attack no-defence reference for the backdoor (ASR) and CA.
* ``badnets:none`` — plain training on the BadNets set: the true no-defence run (CA, ASR and epoch time).

The coordinator sizes the training set to the lease: every worker first times ``--probe-epochs`` plain epochs on
``--probe-images`` (4,000) images while all run at once (a barrier starts them together), then the coordinator picks
the largest training set (a seeded subset, the same for every job) whose projected schedule fits the time left, and
the workers go on. A job still running at the deadline is stopped and reported as such. Each job's result, the plan,
the probes and the logs come back as one JSON, one markdown page and one log file (the device tool returns at most 8
files).
The probe is optimistic: on the first lease (13 jobs, 4,000 images, 3 epochs) it read 0.164 ms per image-epoch per
job and the jobs then ran at 0.32 (workers that finish their probe early leave the card to the rest), so every job was
stopped near epoch 40 of 100; hence the default ``--safety`` 2.2, and ``--n-train`` to fix the size from a past run.
Deviations: one seed; a subset of the 60,000 images when the lease is short (the page says how many); a small-CNN
clean surrogate (8 epochs) for label-consistent's PGD, as in ``bench/abl.py``; the paper's Cutout is not applied.

    python bench/abl_gpu_attacks.py --data-root .data/fashion-mnist --budget 520 --out $OUT/abl_gpu_attacks
    python bench/abl_gpu_attacks.py --smoke --out /tmp/smoke/abl_gpu_attacks   # tiny, any device: the path works
    python bench/abl_gpu_attacks.py --render --out bench/results/abl_gpu_attacks   # re-render the page from its JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from _common import cpu_name, write_markdown_keeping_notes, write_results  # noqa: E402

log = logging.getLogger("bench.abl_gpu_attacks")
ARCH = "preact-resnet18"
DEFAULT_JOBS = ("badnets:retrain,blend:retrain,trojan:retrain,wanet:retrain,sig:retrain,label-consistent:retrain,"
                "badnets:paper,blend:paper,trojan:paper,wanet:paper,sig:paper,label-consistent:paper,badnets:none")
#: clean-label attacks run at a rate that leaves part of the target class clean (10% would be all of it)
CLEAN_LABEL_RATE = 0.05


def job_name(spec: str) -> str:
    return spec.replace(":", "_")


# ------------------------------------------------------------------------------------------------ worker
def _wait_for(path: Path, timeout: float) -> bool:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.2)
    return True


def worker(args: argparse.Namespace) -> None:
    import torch

    from abl_guard.abl.abl import ABLConfig, run_abl
    from abl_guard.abl.data import load_dataset, pad_to
    from abl_guard.abl.experiment import ExperimentConfig, make_evaluator, prepare_data
    from abl_guard.abl.models import build_model
    from abl_guard.abl.train import PlainTrainer, TrainConfig, select_device, set_seed, train_plain

    attack, mode = args.worker.split(":")
    name, run = job_name(args.worker), Path(args.run_dir)
    device = select_device(args.device)
    rate = CLEAN_LABEL_RATE if attack in ("sig", "label-consistent") else args.rate

    def train_cfg(epochs: int, lr: float, milestones: tuple[int, ...]) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, momentum=0.9,
                           weight_decay=args.weight_decay, lr_milestones=milestones, lr_gamma=0.1,
                           augment="crop-flip", seed=args.seed, device=args.device)

    # ---- probe: plain epochs on PROBE_IMAGES clean images, all workers at once (after the barrier)
    full = load_dataset("fashion-mnist", "train", args.data_root)
    sub = pad_to(full.subset(np.arange(min(args.probe_images, len(full)))), 32)  # only the probe's images padded
    spec = sub.spec
    set_seed(args.seed)
    probe = PlainTrainer(build_model(ARCH, 1, spec.num_classes, 32, spec.mean, spec.std), sub.images, sub.labels,
                         train_cfg(args.probe_epochs, args.lr, ()))
    (run / f"ready_{name}").write_text("1")
    _wait_for(run / "go", 180)
    for _ in range(args.probe_epochs):
        probe.epoch(quiet=True)
    secs = probe.epoch_seconds[1:] or probe.epoch_seconds
    (run / f"probe_{name}.json").write_text(json.dumps({"epoch_seconds": probe.epoch_seconds,
                                                          "seconds_per_image": statistics.median(secs) / len(sub)}))
    del probe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not _wait_for(run / "plan.json", 240):
        raise SystemExit("no plan from the coordinator")
    plan = json.loads((run / "plan.json").read_text())
    n_train = int(plan["n_train"])

    # ---- the job
    t_job = time.perf_counter()
    tcfg = train_cfg(args.epochs, args.lr, tuple(args.milestones))
    params: dict[str, Any] = {"rate": rate, "target": 0}
    surrogate_info = None
    if attack == "label-consistent":  # PGD needs a clean model: a small CNN on the clean subset, as bench/abl.py
        clean = prepare_data(ExperimentConfig(dataset="fashion-mnist", data_root=args.data_root, attack=None,
                                              arch="small-cnn", pad=32, train_limit=n_train,
                                              test_limit=args.test_limit, train=tcfg))
        set_seed(args.seed)
        sur = build_model("small-cnn", 1, spec.num_classes, 32, spec.mean, spec.std)
        train_plain(sur, clean.train.images, clean.train.labels, train_cfg(8, 0.05, (5, 7)), None, quiet=True)
        sur.eval()
        surrogate_info = make_evaluator(clean, device)(sur)
        params.update({"model": sur, "steps": args.lc_steps})
    cfg = ExperimentConfig(dataset="fashion-mnist", data_root=args.data_root, attack=attack, attack_params=params,
                           arch=ARCH, pad=32, train_limit=n_train, test_limit=args.test_limit, train=tcfg)
    data = prepare_data(cfg)
    evaluate = make_evaluator(data, device)
    poison = data.poison_indices
    set_seed(args.seed)
    model = build_model(ARCH, 1, spec.num_classes, 32, spec.mean, spec.std)
    prep_seconds = time.perf_counter() - t_job
    record: dict[str, Any] = {"job": args.worker, "attack": attack, "mode": mode, "rate": rate,
                              "n_train": len(data.train), "n_poisoned": int(len(poison)),
                              "prep_seconds": prep_seconds, "surrogate": surrogate_info}
    t0 = time.perf_counter()
    if mode == "none":
        trainer = PlainTrainer(model, data.train.images, data.train.labels, tcfg)
        for _ in range(args.epochs):
            trainer.epoch(quiet=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        record.update({"seconds": time.perf_counter() - t0, "epoch_seconds": trainer.epoch_seconds,
                       **evaluate(trainer.model)})
    else:
        abl_cfg = ABLConfig.from_train(tcfg, {"mode": mode, "eval_every": 0})
        res = run_abl(model, data.train.images, data.train.labels, abl_cfg, out_dir=None, evaluate=evaluate,
                      poison_indices=poison, quiet=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rep = res.report
        final = rep["stages"][list(rep["stages"])[-1]]
        iso = rep.get("isolation") or {}
        iso_epochs = sum(1 for h in res.history if h.get("stage") == "isolation")
        clean_epochs = sum(1 for h in res.history if h.get("stage") == "clean")
        record.update({
            "seconds": time.perf_counter() - t0, "seconds_by_stage": rep["seconds"],
            "clean_accuracy": final["clean_accuracy"], "attack_success_rate": final.get("attack_success_rate"),
            "stages": {k: {m: v.get(m) for m in ("clean_accuracy", "attack_success_rate")}
                       for k, v in rep["stages"].items()},
            "isolation_epochs_run": iso_epochs, "clean_epochs_run": clean_epochs,
            "n_removed": int(len(res.removed)), "removed_poison": int(np.isin(res.removed, poison).sum()),
            "n_isolated": int(len(res.isolated)), "isolated_poison": int(np.isin(res.isolated, poison).sum()),
            "isolation": {k: iso.get(k) for k in ("n_isolated", "precision", "recall", "auroc", "skipped")},
            "expansion": rep.get("expansion"), "verdict": rep.get("verdict"), "warnings": rep.get("warnings"),
        })
    (run / f"result_{name}.json").write_text(json.dumps(record, default=float))
    log.info("%s done: %s", args.worker, {k: record.get(k) for k in ("clean_accuracy", "attack_success_rate",
                                                                     "seconds")})


# ------------------------------------------------------------------------------------------------ coordinator
def coordinator(args: argparse.Namespace) -> None:
    t_start = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for f in run.iterdir():
        f.unlink()
    jobs = [j for j in args.jobs.split(",") if j]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    passthrough = ["--data-root", str(args.data_root), "--run-dir", str(run), "--device", args.device,
                   "--epochs", str(args.epochs), "--milestones", ",".join(map(str, args.milestones)),
                   "--lr", str(args.lr), "--rate", str(args.rate), "--seed", str(args.seed),
                   "--batch-size", str(args.batch_size), "--weight-decay", str(args.weight_decay),
                   "--probe-epochs", str(args.probe_epochs), "--probe-images", str(args.probe_images),
                   "--lc-steps", str(args.lc_steps)]
    if args.test_limit:
        passthrough += ["--test-limit", str(args.test_limit)]
    procs: dict[str, subprocess.Popen] = {}
    for j in jobs:
        logf = open(run / f"log_{job_name(j)}.txt", "w")  # noqa: SIM115 (closed with the process)
        procs[j] = subprocess.Popen([sys.executable, __file__, "--worker", j, *passthrough], env=env,
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    # barrier: every worker has loaded its data and model, then all probe at once
    t0 = time.time()
    while time.time() - t0 < 180 and not all((run / f"ready_{job_name(j)}").exists() or procs[j].poll() is not None
                                              for j in jobs):
        time.sleep(0.2)
    (run / "go").write_text("1")
    t_go = time.time()
    while time.time() - t0 < 300 and not all((run / f"probe_{job_name(j)}.json").exists()
                                              or procs[j].poll() is not None for j in jobs):
        time.sleep(0.2)
    probes = {j: json.loads((run / f"probe_{job_name(j)}.json").read_text()) for j in jobs
              if (run / f"probe_{job_name(j)}.json").exists()}
    if not probes:
        raise SystemExit("no worker finished its probe: see " + str(run))
    per_image = max(p["seconds_per_image"] for p in probes.values())  # the slowest, with every job running
    left = args.budget - (time.time() - t_start) if args.budget else float("inf")
    # the longest job: retrain mode's isolation (at most T_te = 20% of T) + a whole schedule + scans and evaluation
    epochs_equiv = args.epochs * 1.2 * args.safety
    n_fit = (left - args.reserve) / (per_image * epochs_equiv) if args.budget else float("inf")
    n_full = 60000 if not args.smoke else args.smoke_images
    n_train = int(min(n_full, max(args.min_images, n_fit)) // 1000 * 1000) if not args.smoke else n_full
    if args.n_train:
        n_train = args.n_train
    deadline = t_start + args.budget - args.finish if args.budget else float("inf")
    plan = {"n_train": n_train, "n_fit": n_fit if n_fit != float("inf") else None, "seconds_per_image": per_image,
            "seconds_left_at_plan": left if left != float("inf") else None, "epochs_equiv": epochs_equiv,
            "barrier_seconds": t_go - t0, "probe_seconds": time.time() - t_go}
    (run / "plan.json").write_text(json.dumps(plan))
    log.info("plan: %s", plan)
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(1.0)
    stopped = [j for j, p in procs.items() if p.poll() is None]
    for j in stopped:
        log.warning("%s still running at the deadline: stopped", j)
        os.killpg(procs[j].pid, signal.SIGKILL)
    for p in procs.values():
        p.wait()

    results: dict[str, Any] = {}
    for j in jobs:
        f = run / f"result_{job_name(j)}.json"
        if f.exists():
            results[j] = json.loads(f.read_text())
        else:
            tail = (run / f"log_{job_name(j)}.txt").read_text().splitlines()[-15:]
            results[j] = {"job": j, "failed": "stopped at the deadline" if j in stopped else
                          f"exit code {procs[j].returncode}", "log_tail": tail}
    record = {"device": device_name(args.device), "host": platform.node(), "python": platform.python_version(),
              "torch": torch_version(), "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "jobs": jobs, "plan": plan, "probes": probes, "results": results,
              "script_seconds": time.time() - t_start}
    md = render(record)
    write_results(out, json.loads(json.dumps(record, default=float)), md, keep_notes=True)
    with open(out.parent / (out.name + "_log.txt"), "w") as f:
        for j in jobs:
            f.write(f"===== {j}\n")
            f.write("\n".join((run / f"log_{job_name(j)}.txt").read_text().splitlines()[-args.log_lines:]) + "\n")
    print(md)


def torch_version() -> str:
    import torch

    return f"{torch.__version__} (CUDA {torch.version.cuda})"


def device_name(name: str) -> str:
    import torch

    if name != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {cpu_name()}"


# ------------------------------------------------------------------------------------------------ page
def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) and v == v else "—"


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' records as one page's: each result keeps the index of its run (``run``), so that times are
    compared only inside one run (jobs sharing a card run at the speed of what shares it)."""
    first = records[0]
    results: dict[str, Any] = {}
    for i, r in enumerate(records):
        results.update({k: {**v, "run": i} for k, v in r["results"].items()})
    return {**first, "jobs": [j for r in records for j in r["jobs"]], "results": results, "runs": [
        {"jobs": r["jobs"], "plan": r["plan"], "script_seconds": r["script_seconds"]} for r in records]}


def render(r: dict[str, Any]) -> str:
    s, res = r["settings"], r["results"]
    runs = r.get("runs") or [{"jobs": r["jobs"], "plan": r["plan"], "script_seconds": r["script_seconds"]}]
    attacks = list(dict.fromkeys(j.split(":")[0] for j in r["jobs"]))
    n_train = next((v["n_train"] for v in res.values() if "n_train" in v), r["plan"]["n_train"])
    sharing = " / ".join(f"{len(x['jobs'])} jobs ({x['plan']['seconds_per_image'] * 1000:.3f} ms per image-epoch "
                         "per job in the probe)" for x in runs)
    lines = [
        "# ABL on the six attacks at the paper's setting, one GPU (`bench/abl_gpu_attacks.py`)", "",
        f"Device: **{r['device']}**, torch {r['torch']}, Python {r['python']}. PreAct-ResNet-18, Fashion-MNIST padded "
        f"to 32×32, **{n_train:,} training images** (a seeded subset of 60,000, sized to the lease), T = "
        f"{s['epochs']}, SGD lr {s['lr']} / 10 at {s['milestones']}, batch {s['batch_size']}, crop + flip, target 0, "
        f"seed {s['seed']}; BadNets / Blend / Trojan / WaNet at {s['rate']:.0%}, SIG and label-consistent at "
        f"{CLEAN_LABEL_RATE:.0%} (half of the target class). Test: {s['test_limit'] or 10000:,} clean images and "
        f"their triggered versions (target-class images excluded). {len(runs)} run(s) sharing the card: {sharing}.",
        "",
        "No defence: the `none` job is plain training (BadNets only); for every attack, paper mode's model *before* "
        "unlearning (the whole schedule on 99% of the poisoned set) is the no-defence reference.", "",
        "| attack | no defence CA / ASR % | retrain (default) CA / ASR % | removed (poison / all) | isolation epochs | "
        "verdict | paper mode CA / ASR % | paper isolation precision % | time / plain of its run (retrain, paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {v.get("run", 0): v["seconds"] for k, v in res.items() if k.endswith(":none") and "seconds" in v}
    for a in attacks:
        rt, pp, nd = res.get(f"{a}:retrain", {}), res.get(f"{a}:paper", {}), res.get(f"{a}:none")
        before = (pp.get("stages") or {}).get("clean")
        refs = ([f"{_pct(nd['clean_accuracy'])} / {_pct(nd.get('attack_success_rate'))} (plain)"]
                if nd and "clean_accuracy" in nd else [])
        refs += ([f"{_pct(before['clean_accuracy'])} / {_pct(before.get('attack_success_rate'))} (paper, before "
                  "unlearning)"] if before else [])
        if "failed" in rt or not rt:
            rt_s, rm, ep, vd = f"({rt.get('failed', 'not run')})", "—", "—", "—"
        else:
            rt_s = f"{_pct(rt['clean_accuracy'])} / {_pct(rt['attack_success_rate'])}"
            rm = f"{rt['removed_poison']:,} / {rt['n_removed']:,} (of {rt['n_poisoned']:,} poisoned)"
            ep = str(rt["isolation_epochs_run"])
            vd = (rt.get("verdict") or {}).get("status", "—")
        if "failed" in pp or not pp:
            pp_s, prec = f"({pp.get('failed', 'not run')})", "—"
        else:
            pp_s = f"{_pct(pp['clean_accuracy'])} / {_pct(pp['attack_success_rate'])}"
            prec = _pct((pp.get("isolation") or {}).get("precision"))
        ratio = ", ".join(f"{x['seconds'] / plain[x.get('run', 0)]:.2f}"
                          if x.get("seconds") and x.get("run", 0) in plain else "—" for x in (rt, pp))
        lines.append(f"| {a} | {'; '.join(refs) or '—'} | {rt_s} | {rm} | {ep} | {vd} | {pp_s} | {prec} | {ratio} |")
    lines += ["", "Seconds per job (jobs shared the card with the others of their run, so these are comparable only "
              "as ratios inside one run): " + ", ".join(
                  f"{k} {v['seconds']:.0f}" + (f" (run {v['run']})" if len(runs) > 1 else "")
                  for k, v in res.items() if "seconds" in v) + "."]
    fails = {k: v for k, v in res.items() if "failed" in v}
    if fails:
        lines += ["", "Jobs that did not finish: " + "; ".join(f"{k}: {v['failed']}" for k, v in fails.items())]
    verdicts = [(k, v["verdict"]) for k, v in res.items() if v.get("verdict") and k.endswith(":retrain")]
    if verdicts:
        lines += ["", "Verdict evidence (retrain mode):", ""]
        lines += [f"- {k}: **{v['status']}** — " + "; ".join(v.get("evidence", [])[:3]) for k, v in verdicts]
    for i, x in enumerate(runs):
        plan = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in x["plan"].items()}
        lines += ["", f"Run {i}: jobs {', '.join(x['jobs'])}; plan {json.dumps(plan)}; script "
                  f"{x['script_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default=DEFAULT_JOBS, help="comma-separated ATTACK:MODE (mode retrain, paper or none)")
    ap.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--milestones", type=lambda s: [int(x) for x in s.split(",") if x], default=[20, 70])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rate", type=float, default=0.1, help="poison rate of the dirty-label attacks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=5000)
    ap.add_argument("--lc-steps", type=int, default=20)
    ap.add_argument("--probe-epochs", type=int, default=3)
    ap.add_argument("--probe-images", type=int, default=4000)
    ap.add_argument("--budget", type=float, default=0.0, help="seconds for the whole script (0: no limit)")
    ap.add_argument("--reserve", type=float, default=45.0, help="seconds kept for data preparation and evaluation")
    ap.add_argument("--finish", type=float, default=15.0, help="seconds before the budget's end to stop jobs")
    ap.add_argument("--safety", type=float, default=2.2, help="margin on the projected schedule (see the docstring)")
    ap.add_argument("--min-images", type=int, default=3000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--run-dir", default="/tmp/abl-gpu-attacks")
    ap.add_argument("--log-lines", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "abl_gpu_attacks"))
    ap.add_argument("--smoke", action="store_true", help="2 epochs on a tiny set: checks the path only")
    ap.add_argument("--smoke-images", type=int, default=2000)
    ap.add_argument("--render", action="store_true", help="re-render --out's page from its JSON (or --merge's)")
    ap.add_argument("--merge", default=None, help="with --render: comma-separated run JSONs shown on one page")
    ap.add_argument("--n-train", type=int, default=None, help="training images (skips the projection)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        sources = args.merge.split(",") if args.merge else [str(Path(args.out).with_suffix(".json"))]
        write_markdown_keeping_notes(Path(args.out).with_suffix(".md"),
                                     render(merge([json.loads(Path(f).read_text()) for f in sources])))
        return
    if args.smoke and not args.worker:
        args.epochs, args.milestones, args.probe_epochs, args.test_limit, args.lc_steps = 5, [3], 2, 300, 2
        args.probe_images = 256
    if args.worker:
        worker(args)
    else:
        coordinator(args)


if __name__ == "__main__":
    main()

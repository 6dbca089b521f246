"""abl-guard command line: a thin click group over the rooms (abl/, attacks/, export/, guard/)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("abl_guard")


def parse_kv(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are parsed as JSON when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.version_option(package_name="abl-guard")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Train with Anti-Backdoor Learning, export to ONNX with taps, and guard deployed classifiers."""
    from abl_guard.guard.progress import set_quiet

    _setup_logging(verbose, quiet)
    set_quiet(quiet)
    ctx.obj = {"quiet": quiet}


# ------------------------------------------------------------------------------------------------ train


@main.command()
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, digits, cifar10, gtsrb, imagefolder, or a dataset .npz.")
@click.option("--data-root", type=click.Path(), default=None, help="Where the dataset files are.")
@click.option("--attack", default="badnets", show_default=True, help="Poisoning attack, or 'none'.")
@click.option("--rate", type=float, default=0.1, show_default=True, help="Poisoning rate.")
@click.option("--target", type=int, default=0, show_default=True, help="Attack target class.")
@click.option("--attack-param", "attack_params", multiple=True, metavar="KEY=VALUE",
              help="Extra attack parameter (repeatable), e.g. size=4 position=top-left.")
@click.option("--defense", default="none", show_default=True, help="Training defence.")
@click.option("--defense-param", "defense_params", multiple=True, metavar="KEY=VALUE",
              help="Extra defence parameter (repeatable).")
@click.option("--arch", default="small-cnn", show_default=True,
              help="small-cnn, preact-resnet18 or wrn-16-1.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--lr-milestones", default="", help="Comma-separated epochs where lr is divided by 10.")
@click.option("--augment", type=click.Choice(["none", "crop", "crop-flip"]), default="none", show_default=True)
@click.option("--pad", type=int, default=None, help="Zero-pad images to this size (e.g. 32 for ResNets).")
@click.option("--train-limit", type=int, default=None, help="Use a random subset of the training set.")
@click.option("--test-limit", type=int, default=None, help="Use a random subset of the test set.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Autocast precision of the forward pass; auto = bf16 on CUDA (when supported), fp32 on CPU.")
@click.option("--memory-format", type=click.Choice(["auto", "channels-last", "contiguous"]), default="auto",
              show_default=True, help="Tensor layout for training; auto = channels-last on CUDA only.")
@click.option("--abl-gamma", type=float, default=0.5, show_default=True,
              help="ABL: LGA threshold gamma; the isolation loss is sign(loss - gamma) * loss.")
@click.option("--abl-lga", type=click.Choice(["flooding", "per-example"]), default="flooding", show_default=True,
              help="ABL: LGA on the batch-mean loss (official code) or on every example (BackdoorBox).")
@click.option("--abl-isolation-epochs", type=int, default=None,
              help="ABL: isolation epochs T_te, part of --epochs (the rest is the clean stage). "
                   "[default: 20% of --epochs, the paper's 20 of 100]")
@click.option("--abl-isolation-ratio", type=float, default=0.01, show_default=True,
              help="ABL: fraction p of the training set isolated as suspected poison (lowest loss at T_te).")
@click.option("--abl-isolation-score", type=click.Choice(["class-relative", "loss"]), default="class-relative",
              show_default=True,
              help="ABL: rank by the loss relative to the median loss of the example's own label (class-relative) "
                   "or by the raw loss (the paper).")
@click.option("--abl-isolation-reference", type=float, default=0.5, show_default=True,
              help="ABL: the quantile of its label's log-loss that the class-relative score measures an example "
                   "against (0.5 = the median; higher stays on the clean examples when over half a label is poisoned).")
@click.option("--abl-isolation-labels", type=click.Choice(["all", "target"]), default="all", show_default=True,
              help="ABL: unlearn every isolated example (all, the paper) or only those with the isolated set's "
                   "majority label, the suspected target of an all-to-one backdoor (target; the others go back to "
                   "the clean set).")
@click.option("--abl-unlearning", type=click.Choice(["joint", "ascent"]), default="joint", show_default=True,
              help="ABL: unlearning objective: CE(clean batch) - CE(isolated batch) per step (joint, the paper's "
                   "L_GGA) or -CE(isolated batch) alone (ascent, the official code).")
@click.option("--abl-unlearning-bound", type=float, default=5.0, show_default=True,
              help="ABL: stop the ascent on an isolated example once its cross-entropy exceeds this (0 = unbounded, "
                   "the paper).")
@click.option("--abl-unlearning-ascent", type=click.Choice(["negated-ce", "complement"]), default="negated-ce",
              show_default=True,
              help="ABL: the ascent term on isolated examples: -CE (the paper) or -log(1 - p_label) (complementary "
                   "label: strongest while the example is still fitted, fading once it is unlearned).")
@click.option("--abl-unlearning-epochs", type=int, default=5, show_default=True,
              help="ABL: gradient-ascent epochs on the isolated set, after --epochs.")
@click.option("--abl-unlearning-lr", type=float, default=5e-4, show_default=True,
              help="ABL: unlearning learning rate (official code 5e-4).")
@click.option("--abl-unlearning-bn", type=click.Choice(["train", "frozen"]), default="train", show_default=True,
              help="ABL: BatchNorm during unlearning: batch statistics (official code) or frozen running statistics.")
@click.option("--abl-max-ca-drop", type=float, default=0.02, show_default=True,
              help="ABL: stop unlearning (and roll back the epoch) when held-out accuracy drops more than this "
                   "(0.02 = 2 points).")
@click.option("--abl-holdout", type=float, default=0.02, show_default=True,
              help="ABL: fraction of the training set held out (never trained on) for the unlearning guard; "
                   "0 disables the guard.")
@click.option("--abl-eval-every", type=int, default=1, show_default=True,
              help="ABL: evaluate CA/ASR every N isolation/clean epochs (0 = only after each stage; unlearning "
                   "epochs are always evaluated).")
@click.option("--resume", is_flag=True, help="Continue an interrupted --defense abl run from its run directory.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run directory (model.pt, run.json, poison_indices.npy).")
@click.pass_context
def train(ctx: click.Context, dataset: str, data_root: str | None, attack: str, rate: float, target: int,
          attack_params: tuple[str, ...], defense: str, defense_params: tuple[str, ...], arch: str, epochs: int,
          batch_size: int, lr: float, momentum: float, weight_decay: float, lr_milestones: str, augment: str,
          pad: int | None, train_limit: int | None, test_limit: int | None, seed: int, device: str,
          precision: str, memory_format: str, resume: bool, out_dir: str, **abl_options: Any) -> None:
    """Train a classifier on (possibly poisoned) data; reports clean accuracy (CA) and attack success (ASR).

    With --defense abl, --epochs is ABL's total T (isolation + clean stage) and the --abl-* options set the rest.
    """
    from abl_guard.abl.experiment import ExperimentConfig, run_experiment
    from abl_guard.abl.train import TrainConfig

    milestones = tuple(int(m) for m in lr_milestones.split(",") if m.strip())
    params = parse_kv(defense_params)
    explicit = {k[len("abl_"):] for k in abl_options
                if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    if defense == "abl":
        clash = sorted(explicit & set(params))
        if clash:
            raise click.UsageError(f"ABL parameter(s) {clash} given both as --abl-* options and --defense-param")
        params = {**{k[len("abl_"):]: v for k, v in abl_options.items() if v is not None}, **params}
    elif explicit:
        raise click.UsageError(f"--abl-* options need --defense abl (got {', '.join(sorted(explicit))})")
    cfg = ExperimentConfig(
        dataset=dataset, data_root=data_root,
        attack=None if attack == "none" else attack,
        attack_params={"rate": rate, "target": target, **parse_kv(attack_params)},
        arch=arch, defense=defense, defense_params=params,
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, lr_milestones=milestones, augment=augment, seed=seed,
                          device=device, precision=precision, memory_format=memory_format),
        pad=pad, train_limit=train_limit, test_limit=test_limit, resume=resume,
    )
    record = run_experiment(cfg, out_dir, quiet=ctx.obj["quiet"])
    if "abl" in record:
        from abl_guard.abl.abl import summary_lines

        for line in summary_lines(record["abl"]):
            click.echo(line)
    m = record["metrics"]
    msg = f"CA {100 * m['clean_accuracy']:.2f}%"
    if "attack_success_rate" in m:
        msg += f"  ASR {100 * m['attack_success_rate']:.2f}%"
    click.echo(f"{msg}  ({record['train_seconds']:.0f}s on {record['device']}) -> {Path(out_dir) / 'model.pt'}")



# ------------------------------------------------------------------------------------------------ export


def _parse_floats(text: str | None) -> list[float] | None:
    return None if not text else [float(v) for v in text.split(",")]


def _parse_taps(taps: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for t in taps:
        name, sep, spec = t.partition("=")
        out[name if sep else t.split(":")[0].replace(".", "_")] = spec if sep else t
    return out


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The .onnx file to write.")
@click.option("--tap", "taps", multiple=True, metavar="[NAME=]MODULE[:in]",
              help="Expose a module's output (or ':in' its input) as a named output (repeatable). Default: the "
                   "model's declared taps.")
@click.option("--arch", default=None,
              help="For a bare state dict: a torchvision architecture name (resnet18) or package.module:Class.")
@click.option("--num-classes", type=int, default=None, help="With --arch: number of classes.")
@click.option("--input-shape", default=None, metavar="C,H,W", help="With --arch: input shape.")
@click.option("--mean", default=None, metavar="M1,M2,...", help="With --arch: normalisation mean per channel.")
@click.option("--std", default=None, metavar="S1,S2,...", help="With --arch: normalisation std per channel.")
@click.option("--class-names", default=None, help="With --arch: comma-separated class names.")
@click.option("--penultimate", default=None, metavar="MODULE[:in]",
              help="With --arch: where the penultimate features are (default: input of the last Linear).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity tolerance torch vs onnxruntime.")
def export(checkpoint: str, output: str, taps: tuple[str, ...], arch: str | None, num_classes: int | None,
           input_shape: str | None, mean: str | None, std: str | None, class_names: str | None,
           penultimate: str | None, opset: int, atol: float) -> None:
    """Export a checkpoint to one ONNX file with logits and named taps; verifies parity with onnxruntime."""
    from abl_guard.export import NormalizedModel, build_foreign_model, default_penultimate, export_onnx
    from abl_guard.guard.bundle import sha256_file

    tap_map = _parse_taps(taps)
    source_sha = sha256_file(checkpoint)
    if arch is None:
        from abl_guard.abl.checkpoint import load_checkpoint

        try:
            model, meta = load_checkpoint(checkpoint)
        except ValueError as e:
            raise click.ClickException(str(e)) from e
        spec = meta["spec"]
        tap_map = tap_map or dict(meta["taps"])
        if "penultimate" not in tap_map:
            tap_map["penultimate"] = meta["taps"].get("penultimate") or default_penultimate(model)
        kwargs = dict(input_shape=spec["input_shape"], class_names=spec["class_names"], mean=spec["mean"],
                      std=spec["std"], tap_root=None)
        extra = {"arch": meta["arch"], "dataset": spec["name"], "source_checkpoint_sha256": source_sha,
                 "training": {k: meta.get(k) for k in ("metrics", "attack", "defense")}}
    else:
        if not (num_classes and input_shape and mean and std):
            raise click.UsageError("--arch needs --num-classes, --input-shape, --mean and --std")
        net = build_foreign_model(arch, checkpoint, num_classes)
        shape = [int(v) for v in input_shape.split(",")]
        means, stds = _parse_floats(mean), _parse_floats(std)
        model = NormalizedModel(net, means, stds)
        tap_map.setdefault("penultimate", penultimate or default_penultimate(net))
        names = class_names.split(",") if class_names else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise click.UsageError(f"--class-names has {len(names)} names for {num_classes} classes")
        kwargs = dict(input_shape=shape, class_names=names, mean=means, std=stds, tap_root=net)
        extra = {"arch": arch, "source_checkpoint_sha256": source_sha}
    try:
        report = export_onnx(model, output, taps=tap_map, extra_metadata=extra, opset=opset, atol=atol, **kwargs)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    worst = max(report.parity.values())
    click.echo(f"{report.path}: outputs {', '.join(report.outputs)}; parity max |diff| {worst:.2e}; "
               f"sha256 {report.sha256[:16]}")


# ------------------------------------------------------------------------------------------------ calibrate


@main.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", default="fashion-mnist", show_default=True, help="Clean labelled data (or a .npz).")
@click.option("--data-root", type=click.Path(), default=None)
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--start", type=int, default=0, show_default=True, help="First image of the split to use.")
@click.option("--count", type=int, default=5000, show_default=True, help="Number of clean images to use.")
@click.option("--fpr", type=float, default=0.01, show_default=True, help="Target false-positive rate of the guard.")
@click.option("--detectors", "detector_names", default="mahalanobis", show_default=True,
              help="Comma-separated detectors.")
@click.option("--detector-param", "detector_params", multiple=True, metavar="DETECTOR.KEY=VALUE",
              help="Detector hyper-parameter (repeatable), e.g. mahalanobis.ridge=0.")
@click.option("--combine", type=click.Choice(["fisher", "min-p"]), default="fisher", show_default=True,
              help="How detectors' p-values are combined: Fisher adds evidence across detectors (default); min-p "
                   "(Bonferroni) suits one detector firing alone. The threshold is set on the combined p-value.")
@click.option("--mondrian", is_flag=True,
              help="Calibrate per predicted class (each class gets its own threshold and the target FPR).")
@click.option("--fractions", default="0.5,0.3,0.2", show_default=True,
              help="Fit / calibration / validation fractions of the clean images (or three counts).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Bundle directory to write; a name ending in .zip writes a single-file archive.")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
def calibrate(model_path: str, dataset: str, data_root: str | None, split: str, start: int, count: int, fpr: float,
              detector_names: str, detector_params: tuple[str, ...], combine: str, mondrian: bool, fractions: str,
              seed: int, output: str, force: bool) -> None:
    """Fit detectors on clean data and calibrate the guard to a target false-positive rate -> a bundle.

    The clean images are split (seeded) into fit / calibration / validation parts; the realised false-positive
    rate on the validation part is reported with a Clopper-Pearson 95% interval and stored in the manifest.
    """
    from abl_guard.abl.data import load_dataset, pad_to
    from abl_guard.detectors import make_detector
    from abl_guard.export import read_metadata
    from abl_guard.guard import calibrate_bundle

    meta = read_metadata(model_path)
    data = load_dataset(dataset, split, data_root)
    c, h, w = meta["input_shape"]
    if data.images.shape[1:3] != (h, w) and data.images.shape[1] < h:
        data = pad_to(data, h)
    data = data.subset(slice(start, start + count))
    if len(data) == 0:
        raise click.UsageError(f"no images in {dataset}/{split}[{start}:{start + count}]")
    per_det: dict[str, dict[str, Any]] = {}
    for key, value in parse_kv(detector_params).items():
        det, sep, param = key.partition(".")
        if not sep:
            raise click.BadParameter(f"expected DETECTOR.KEY=VALUE, got {key}")
        per_det.setdefault(det, {})[param] = value
    names = [n.strip() for n in detector_names.split(",") if n.strip()]
    unknown = set(per_det) - set(names)
    if unknown:
        raise click.BadParameter(f"parameters given for detectors not selected: {sorted(unknown)}")
    try:
        dets = [make_detector(n, **per_det.get(n, {})) for n in names]
    except (ValueError, TypeError) as e:
        raise click.BadParameter(str(e)) from e
    from abl_guard.guard import BundleError

    try:
        manifest = calibrate_bundle(
            model_path, data.images, data.labels, dets, output, fpr=fpr, combine=combine, mondrian=mondrian,
            seed=seed, overwrite=force, fractions=tuple(float(f) for f in fractions.split(",")),
            provenance={"calibration_data": {"dataset": dataset, "split": split, "start": start,
                                             "count": len(data)}},
        )
    except (BundleError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    cal = manifest["calibration"]
    v = cal["validation"]
    click.echo(f"{output}: detectors {', '.join(d['name'] for d in manifest['detectors'])}; combine {cal['combine']}"
               f"{' (Mondrian, per predicted class)' if cal['mondrian'] else ''}; target FPR {fpr:.2%}; validation "
               f"FPR {v['rate']:.2%} (95% CI {v['ci95'][0]:.2%}-{v['ci95'][1]:.2%}, {v['k']}/{v['n']}); "
               f"clean accuracy {v['clean_accuracy']:.2%}")
    if cal["mondrian"]:
        per = ", ".join(f"{c} {r['rate']:.1%} ({r['k']}/{r['n']})" for c, r in v["per_class"].items())
        click.echo(f"validation FPR per predicted class: {per}")
        if cal["fallback_classes"]:
            click.echo(f"classes with too few calibration inputs (pooled threshold): {cal['fallback_classes']}")


# ------------------------------------------------------------------------------------------------ scan


@main.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True,
              help="Verdict file: JSONL (default) or CSV (a .csv name or --format csv); '-' writes to stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="Output format (default: from the output name).")
@click.option("--resume", is_flag=True, help="Skip the inputs already in the output file and append the rest.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None, help="Also write the summary here.")
@click.option("--alarm-alpha", type=float, default=1e-3, show_default=True,
              help="Significance of the target-class alarm (Bonferroni-adjusted binomial test).")
@click.option("--fail-on-flag", is_flag=True, help="Exit with status 3 when any input is flagged.")
@click.option("--fail-on-alarm", is_flag=True, help="Exit with status 3 when the target-class alarm fires.")
@click.option("--fail-on-error", is_flag=True, help="Exit with status 1 when any input got an error record.")
@click.pass_context
def scan(ctx: click.Context, bundle: str, inputs: tuple[str, ...], output: str, fmt: str | None, resume: bool,
         batch_size: int, threads: int | None, summary_json: str | None, alarm_alpha: float, fail_on_flag: bool,
         fail_on_alarm: bool, fail_on_error: bool) -> None:
    """Scan inputs; exactly one record (verdict or error) per input, in input order.

    INPUTS: image folders (recursive: png/jpg/bmp/webp/...; resized to the model's input with a warning count),
    image files, .npy/.npz arrays, JSONL files (one object per line with "path" or base64 "image", optional "id"),
    and '-' for JSONL on stdin. Ctrl-C stops after the current batch and leaves a valid output; --resume continues.

    Exit status: 0 scan complete; 1 the scan could not run (bad bundle, bad output to resume) or, with
    --fail-on-error, some input got an error record; 2 usage error; 3 with --fail-on-flag / --fail-on-alarm when
    anything is flagged / the alarm fires; 130 interrupted. 3 takes precedence over an opt-in 1.
    """
    from abl_guard.guard import BundleError, Guard
    from abl_guard.guard.scan import ScanError, scan_sources

    try:
        g = Guard.load(bundle, batch_size=batch_size, intra_op_threads=threads)
        summary = scan_sources(g, list(inputs), output, batch_size=batch_size, quiet=ctx.obj["quiet"], fmt=fmt,
                               resume=resume, alarm_alpha=alarm_alpha)
    except (BundleError, ScanError, OSError) as e:
        raise click.ClickException(str(e)) from e
    for line in summary.lines():
        click.echo(line, err=True)
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary.to_json(), indent=2))
    if summary.interrupted:
        ctx.exit(130)
    if (fail_on_flag and summary.flagged) or (fail_on_alarm and summary.alarm is not None and summary.alarm.fired):
        ctx.exit(3)
    if fail_on_error and summary.errors:
        ctx.exit(1)


# ------------------------------------------------------------------------------------------------ report


@main.command()
@click.argument("verdicts", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="report.html (self-contained) or report.png.")
@click.option("--bundle", type=click.Path(exists=True), default=None,
              help="The bundle that produced the verdicts: adds the clean calibration distributions and the alarm.")
@click.option("--png", "as_png", is_flag=True, help="Write a PNG image instead of HTML (default for a .png name).")
@click.option("--max-thumbnails", type=int, default=48, show_default=True,
              help="Most suspicious flagged inputs shown (re-read from the ids/sources in the verdicts).")
@click.option("--alarm-alpha", type=float, default=1e-3, show_default=True)
def report(verdicts: str, output: str, bundle: str | None, as_png: bool, max_thumbnails: int,
           alarm_alpha: float) -> None:
    """A one-page report of a scan: flag rate, score histograms against the calibration distribution, the
    flagged inputs as thumbnails, and the target-class alarm."""
    from abl_guard.guard import BundleError
    from abl_guard.guard.report import build_report, write_html, write_png
    from abl_guard.guard.scan import ScanError

    try:
        data = build_report(verdicts, bundle, max_thumbnails=max_thumbnails, alarm_alpha=alarm_alpha)
    except (BundleError, ScanError) as e:
        raise click.ClickException(str(e)) from e
    out = write_png(data, output) if as_png or output.lower().endswith(".png") else write_html(data, output)
    s = data.summary
    click.echo(f"{out}: {s.total} inputs, {s.flagged} flagged ({s.flag_rate:.2%}), {s.errors} errors"
               + (f"; {s.alarm.message()}" if s.alarm else ""))


# ------------------------------------------------------------------------------------------------ poison


def _model_loader(device: str) -> Any:
    """Reads checkpoint paths given as ``--attack-param model=PATH`` (attacks/ cannot import abl/)."""
    from abl_guard.abl.checkpoint import load_checkpoint
    from abl_guard.abl.train import select_device

    return lambda path: load_checkpoint(path, select_device(device))[0]


@main.command()
@click.option("--attack", required=True, help="badnets, blend, trojan, sig, wanet or label-consistent.")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, digits, cifar10, gtsrb, imagefolder, or a dataset .npz.")
@click.option("--data-root", type=click.Path(), default=None, help="Where the dataset files are.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--rate", type=float, default=0.1, show_default=True, help="Poisoning rate (fraction of the set).")
@click.option("--target", type=int, default=0, show_default=True, help="Attack target class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--attack-param", "attack_params", multiple=True, metavar="KEY=VALUE",
              help="Extra attack parameter (repeatable), e.g. alpha=0.1, or model=CKPT for label-consistent.")
@click.option("--limit", type=int, default=None, help="Poison a random subset of this many images.")
@click.option("--grid", "n_grid", type=int, default=8, show_default=True, help="Examples in the PNG grid.")
@click.option("--triggered-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the triggered test set (ASR set) to this .npz.")
@click.option("--device", default="auto", show_default=True, help="For attacks that run a model.")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Poisoned dataset .npz; OUT.json (manifest), OUT.indices.npy and OUT.png go beside it.")
def poison(attack: str, dataset: str, data_root: str | None, split: str, rate: float, target: int, seed: int,
           attack_params: tuple[str, ...], limit: int | None, n_grid: int, triggered_out: str | None, device: str,
           out_path: str) -> None:
    """Write a poisoned dataset (loadable with `train --dataset OUT.npz`), its manifest and a trigger grid."""
    import numpy as np
    from PIL import Image

    from abl_guard.abl.data import LabelledImages, load_dataset
    from abl_guard.attacks import make_attack
    from abl_guard.attacks.report import example_grid, poison_manifest

    params = {"rate": rate, "target": target, "seed": seed, **parse_kv(attack_params)}
    if isinstance(params.get("model"), str):
        params["model_loader"] = _model_loader(device)
    atk = make_attack(attack, **params)
    data = load_dataset(dataset, split, data_root)
    if limit is not None and limit < len(data):
        data = data.subset(np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False)))
    k = data.spec.num_classes
    result = atk.poison(data.images, data.labels, k)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    LabelledImages(result.images, result.labels, data.spec).save_npz(out)
    files = {"dataset": out.name, "poison_indices": f"{stem.name}.indices.npy", "grid": f"{stem.name}.png"}
    np.save(stem.parent / files["poison_indices"], result.poison_indices)
    cross = getattr(result, "cross_indices", None)
    if cross is not None:
        files["cross_indices"] = f"{stem.name}.cross_indices.npy"
        np.save(stem.parent / files["cross_indices"], cross)
    show = result.poison_indices[:n_grid]
    Image.fromarray(example_grid(data.images[show], result.images[show], n_grid)).save(stem.parent / files["grid"])
    extra: dict[str, Any] = {"dataset": dataset, "split": split, "limit": limit, "files": files}
    if triggered_out:
        test = load_dataset(dataset, "test", data_root) if split == "train" else data
        trig = atk.triggered(test.images, test.labels, k)
        np.savez(triggered_out, images=trig.images, labels=trig.source_labels, target_labels=trig.labels,
                 indices=trig.indices, spec=np.array(json.dumps(test.spec.to_json())))
        extra["triggered"] = {"file": str(triggered_out), "n": int(len(trig.labels))}
    manifest = poison_manifest(atk, result, data.labels, k, **extra)
    stem.with_suffix(".json").write_text(json.dumps(manifest, indent=2, default=str))
    click.echo(f"{attack}: poisoned {len(result.poison_indices)} of {len(data)} {split} images "
               f"({manifest['n_labels_changed']} labels changed) -> {out} (+ {stem.name}.json, .png)")


# ------------------------------------------------------------------------------------------------ adversarial


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--attack", type=click.Choice(["fgsm", "pgd", "cw"]), default="pgd", show_default=True)
@click.option("--dataset", default=None, help="Dataset name or .npz (default: the checkpoint's dataset).")
@click.option("--data-root", type=click.Path(), default=None)
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--limit", type=int, default=1000, show_default=True, help="Attack the first N images (0 = all).")
@click.option("--eps", type=float, default=None,
              help="L-inf budget on the [0,1] scale (fgsm/pgd; default 8/255 colour, 0.1 grayscale).")
@click.option("--steps", type=int, default=None, help="PGD / CW iterations.")
@click.option("--target-class", type=int, default=None, help="Targeted attack towards this class.")
@click.option("--attack-param", "attack_params", multiple=True, metavar="KEY=VALUE",
              help="Extra parameter (repeatable), e.g. step_size=0.01, c=1, kappa=0, binary_search_steps=5.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="The .npz to write.")
def adversarial(checkpoint: str, attack: str, dataset: str | None, data_root: str | None, split: str, limit: int,
                eps: float | None, steps: int | None, target_class: int | None, attack_params: tuple[str, ...],
                batch_size: int, seed: int, device: str, out_path: str) -> None:
    """Adversarial examples against a checkpoint; writes an .npz and reports the success rate.

    The .npz holds `images` (uint8, quantised inside the budget; loadable as a dataset), `labels`, `spec`,
    `images_float` (exact float32 NHWC in [0,1]), `success` / `success_uint8`, predictions and indices.
    """
    import numpy as np

    from abl_guard.abl.checkpoint import load_checkpoint
    from abl_guard.abl.data import load_dataset, pad_to
    from abl_guard.abl.train import select_device
    from abl_guard.attacks.adversarial import evaluate, quantize, run_attack

    model, meta = load_checkpoint(checkpoint, select_device(device))
    spec = meta["spec"]
    data = load_dataset(dataset or spec["name"], split, data_root)
    size = int(spec["input_shape"][1])
    if data.images.shape[1] < size:
        data = pad_to(data, size)
    if limit and limit < len(data):
        data = data.subset(np.arange(limit))
    params = parse_kv(attack_params)
    if eps is not None:
        if attack == "cw":
            raise click.UsageError("--eps does not apply to cw (an L2 attack that minimises the perturbation)")
        params["eps"] = eps
    if steps is not None:
        if attack == "fgsm":
            raise click.UsageError("--steps does not apply to fgsm (a single step)")
        params["steps"] = steps
    if target_class is not None:
        params["targets"] = target_class
    res = run_attack(attack, model, data.images, data.labels, batch_size=batch_size, seed=seed, **params)
    ball = res.params.get("eps") if attack != "cw" and res.params.get("norm", "linf") == "linf" else None
    q = quantize(res.images, data.images, ball)  # rounded to uint8 inside the L-inf ball
    pred_q, success_q = evaluate(model, q, res.labels, res.targets, batch_size)
    ok = res.clean_correct
    rate_q = float(success_q[ok].mean()) if ok.any() else float("nan")
    summary = {**res.summary(), "success_rate_uint8": rate_q, "checkpoint": str(checkpoint),
               "dataset": dataset or spec["name"], "split": split}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=q, labels=res.labels, spec=np.array(json.dumps(spec)), images_float=res.images,
             success=res.success, success_uint8=success_q, clean_pred=res.clean_pred, adv_pred=res.adv_pred,
             adv_pred_uint8=pred_q, indices=np.arange(len(res.labels)),
             targets=res.targets if res.targets is not None else np.zeros(0, np.int64),
             summary=np.array(json.dumps(summary, default=str)))
    click.echo(f"{attack}: success {100 * res.success_rate:.2f}% (float) / {100 * rate_q:.2f}% (uint8) of "
               f"{int(ok.sum())} correctly classified; clean accuracy {100 * summary['clean_accuracy']:.2f}% -> {out}")


if __name__ == "__main__":
    main()

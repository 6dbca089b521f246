"""abl-guard command line: a thin click group over the rooms (abl/, attacks/, export/, guard/)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from abl_guard.detectors import Detector
    from abl_guard.guard.build import CleanData

log = logging.getLogger("abl_guard")

# ------------------------------------------------------------------------------------------------ exit codes

#: every exit status of every command: the one table behind ``--help``, the README's CLI tour and :class:`CliError`
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (one line; rerun with -vv for the traceback); scan --fail-on-error: an input got an error "
       "record",
    2: "usage: a bad option, argument, value or config file",
    3: "scan --fail-on-flag / --fail-on-alarm: an input was flagged / the target-class alarm fired",
    4: "an input (dataset, model, checkpoint, image or verdict file) is missing, unreadable or invalid",
    5: "bundle integrity: not a guard bundle, or its files do not match its manifest",
    6: "output conflict: the output exists (pass --force) or cannot be resumed into",
    7: "the command needs an optional extra that is not installed (the message says which: pip install "
       "'abl-guard[train]')",
    130: "interrupted (Ctrl-C)",
}


def _one_line(message: object, limit: int = 500) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CliError(click.ClickException):
    """A failure the user can act on: a one-line ``Error: ...`` and the exit status of :data:`EXIT_CODES`."""

    exit_code = 1

    def __init__(self, message: object) -> None:
        super().__init__(_one_line(message))


class InvalidValueError(CliError):
    """A value that failed validation (a ``ValueError`` from the rooms); a click usage error without the usage text."""

    exit_code = 2


class InputFileError(CliError):
    exit_code = 4


class BundleIntegrityError(CliError):
    exit_code = 5


class OutputConflictError(CliError):
    exit_code = 6


class MissingExtraError(CliError):
    exit_code = 7


#: modules that come with an extra, not with the core (serving) install
EXTRA_MODULES = {"torch": "train", "torchvision": "train", "onnxscript": "train", "ray": "ray", "pyarrow": "ray"}


class UserInterruptError(CliError):
    exit_code = 130


def _raised_in_abl_guard(e: BaseException) -> bool:
    """Whether ``e`` was raised by abl-guard's own code (a validation message), not deep inside a library (a bug)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("abl_guard.")


def map_error(e: BaseException) -> CliError | None:
    """The :class:`CliError` for one of the project's known failures, or None for an unexpected one.

    The one place that decides exit statuses; command bodies raise the rooms' own exceptions and never catch them.
    """
    import pickle

    from abl_guard.abl.data import DatasetError
    from abl_guard.guard.bundle import BundleError
    from abl_guard.guard.preprocess import InputError

    try:
        from abl_guard.guard.scan import ScanError
    except ImportError:  # pragma: no cover - the runtime extra is part of the core install
        ScanError = ()  # type: ignore[assignment,misc]
    if isinstance(e, KeyboardInterrupt):
        return UserInterruptError("interrupted")
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in EXTRA_MODULES:
        extra = EXTRA_MODULES[(e.name or "").split(".")[0]]
        return MissingExtraError(f"this command needs {e.name}, which the serving install leaves out; install it "
                                 f"with: pip install 'abl-guard[{extra}]'")
    if isinstance(e, BundleError):
        return BundleIntegrityError(e)
    if isinstance(e, FileExistsError):
        return OutputConflictError(e)
    if isinstance(e, (InputError, DatasetError, ScanError, OSError, pickle.UnpicklingError)):
        return InputFileError(e)
    if type(e).__module__.split(".")[0] in ("onnx", "onnxruntime", "google"):  # ONNX / protobuf decode errors
        return InputFileError(f"not a valid ONNX model: {e}")
    if isinstance(e, ValueError) and _raised_in_abl_guard(e):
        return InvalidValueError(e)
    return None


class AblGuardGroup(click.Group):
    """The command group: commands listed in workflow order, NUL bytes refused, errors mapped by :func:`map_error`."""

    #: the order of the workflow (poison data, train, attack, export / adopt, calibrate, scan, report, serve)
    ORDER = ("poison", "train", "adversarial", "export", "adopt", "calibrate", "scan", "report", "serve")

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(self.ORDER)}
        return sorted(self.commands, key=lambda name: (rank.get(name, len(rank)), name))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for arg in args:
            if "\x00" in arg:
                raise click.UsageError(f"argument {arg!r} contains a NUL byte", ctx)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (Exception, KeyboardInterrupt) as e:
            verbose = (ctx.obj or {}).get("verbose", 0)
            mapped = map_error(e)
            if mapped is None:
                if verbose > 1:
                    raise
                mapped = CliError(f"internal error: {type(e).__name__}: {_one_line(e, 300)} (rerun with -vv for "
                                  "the traceback)")
            elif verbose > 1:
                log.debug("%s", mapped.message, exc_info=e)
            raise mapped from e


# ------------------------------------------------------------------------------------------------ options


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


class IntList(click.ParamType):
    """Comma-separated integers (``"6,8"``; a list in a config file) -> a tuple."""

    name = "INT,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        try:
            return tuple(int(v) for v in items)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


def dataclass_options(cls: type, names: tuple[str, ...] | None = None, prefix: str = "") -> list[click.Option]:
    """click options generated from a config dataclass: one per field with ``help`` in its metadata (or the ``names``
    given, in that order), ``--{prefix}{field-name}``, the field's default (or ``cli_default``) and help, and
    ``choices`` as a click.Choice — so the dataclass is the one source of both."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    chosen = [by_name[n] for n in names] if names is not None else [f for f in by_name.values() if "help" in f.metadata]
    out = []
    for f in chosen:
        meta = f.metadata
        default = meta.get("cli_default", f.default)
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):  # X | None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kind = typing.get_origin(hint) or hint
        flag = f"--{prefix}{f.name}".replace("_", "-")
        kwargs: dict[str, Any] = {"help": meta["help"], "default": default,
                                  "show_default": default is not None and default != () and kind is not bool}
        if "choices" in meta:
            kwargs["type"] = click.Choice(list(meta["choices"]))
        elif kind is bool:
            kwargs["is_flag"] = True
        elif kind is tuple:
            kwargs["type"], kwargs["default"] = IntList(), ",".join(str(v) for v in default)
        elif meta.get("path"):
            kwargs["type"] = click.Path()
        else:
            kwargs["type"] = {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)
        out.append(click.Option([flag, (prefix + f.name).replace("-", "_")], **kwargs))
    return out


def _flat_items(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]`` (``[detector-param.mahalanobis] ridge = 0``)."""
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += _flat_items(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _config_defaults(cmd: click.Command, data: dict[str, Any], source: str) -> dict[str, Any]:
    """A TOML config as click's ``default_map`` for ``cmd``: keys are option names (``epochs``, ``abl-gamma``; a
    table prefixes its keys, ``[abl] gamma``); KEY=VALUE options take a table. Unknown keys are a usage error."""
    params: dict[str, click.Option] = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name and p.name != "config":
            params[p.name] = p
            params.update({o.lstrip("-").replace("-", "_"): p for o in p.opts if o.startswith("--")})
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        p = params.get(key.replace("-", "_"))
        if p is None:
            raise click.BadParameter(f"unknown key {key!r} in {source}", param_hint="'--config'")
        if any("\x00" in str(v) for _, v in _flat_items({"v": value})):
            raise click.BadParameter(f"{key!r} in {source} contains a NUL byte", param_hint="'--config'")
        if p.multiple:
            if isinstance(value, dict):  # KEY=VALUE options: a table
                value = [f"{k}={json.dumps(v)}" for k, v in _flat_items(value)]
            value = list(value) if isinstance(value, list) else [value]
        elif isinstance(value, list) and not isinstance(p.type, IntList):
            value = ",".join(str(v) for v in value)  # comma-separated options (--detectors, --fractions)
        out[p.name] = value

    for key, value in data.items():
        if isinstance(value, dict) and params.get(key.replace("-", "_")) is None:
            for sub, v in value.items():
                put(f"{key}_{sub}", v)
        else:
            put(key, value)
    return out


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(value)
    if path.stat().st_size > 1 << 20:
        raise click.BadParameter(f"{value} is larger than 1 MiB", ctx, param)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{value} is not valid TOML: {_one_line(e)}", ctx, param) from e
    ctx.default_map = {**(ctx.default_map or {}), **_config_defaults(ctx.command, data, value)}


def config_option() -> click.Option:
    """``--config run.toml``: option values from a TOML file; flags given on the command line override them."""
    return click.Option(["--config"], type=click.Path(exists=True, dir_okay=False), is_eager=True,
                        expose_value=False, callback=_load_config,
                        help="TOML file of option values, keyed by option name (epochs = 4; [abl] gamma = 0.3; "
                             "[attack-param] size = 4); flags on the command line override it.")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _exit_code_epilog() -> str:
    rows = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    return f"\b\nExit status:\n{rows}"


@click.group(cls=AblGuardGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=_exit_code_epilog())
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug and tracebacks).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.version_option(package_name="abl-guard")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Train with Anti-Backdoor Learning, export to ONNX with taps, and guard deployed classifiers."""
    from abl_guard.guard.progress import set_quiet

    _setup_logging(verbose, quiet)
    set_quiet(quiet)
    ctx.obj = {"quiet": quiet, "verbose": verbose}


# ------------------------------------------------------------------------------------------------ train


def _train_params() -> list[click.Parameter]:
    """train's options: generated from ExperimentConfig / TrainConfig / ABLConfig (torch-free modules), plus the
    attack's rate / target / KEY=VALUE parameters, the ``--defense-param`` alias and the run directory."""
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.run_config import ExperimentConfig, TrainConfig

    exp = {o.name: o for o in dataclass_options(ExperimentConfig)}
    head = [exp.pop(name) for name in ("dataset", "data_root", "test_data", "attack")]  # the attack's options follow
    tail = list(exp.values())
    return [
        config_option(),
        *head,
        click.Option(["--rate"], type=click.FloatRange(0, 1), default=0.1, show_default=True,
                     help="Poisoning rate (fraction of the training set)."),
        click.Option(["--target"], type=click.IntRange(min=0), default=0, show_default=True,
                     help="Attack target class."),
        click.Option(["--attack-param", "attack_params"], multiple=True, metavar="KEY=VALUE",
                     help="Extra attack parameter (repeatable), e.g. size=4 position=top-left, pattern=patch.npy or "
                          "pattern=[[255,0],[0,255]]."),
        *tail,
        click.Option(["--defense-param", "defense_params"], multiple=True, metavar="KEY=VALUE",
                     help="Alias of the --abl-* options (KEY=VALUE, repeatable; validated the same way)."),
        *dataclass_options(TrainConfig),
        *dataclass_options(ABLConfig, ABLConfig.ABL_KNOBS, prefix="abl-"),
        click.Option(["-o", "--out", "out_dir"], type=click.Path(file_okay=False), required=True,
                     help="Run directory (model.pt, run.json, poison_indices.npy)."),
    ]


@main.command(params=_train_params())
@click.pass_context
def train(ctx: click.Context, dataset: str, attack: str, rate: float, target: int, attack_params: tuple[str, ...],
          defense: str, defense_params: tuple[str, ...], out_dir: str, **options: Any) -> None:
    """Train a classifier on (possibly poisoned) data; reports clean accuracy (CA) and attack success (ASR).

    With --defense abl, --epochs is ABL's total T (isolation + clean stage) and the --abl-* options set the rest.
    Every option's default and help come from the run's config dataclasses; --config run.toml sets them from a file.

    Multi-process: torchrun --nproc_per_node N -m abl_guard.cli train ... trains with DistributedDataParallel (NCCL
    on GPUs, gloo on CPU); --batch-size is then the global batch, split over the N ranks; rank 0 writes the run.
    """
    import dataclasses

    from abl_guard.abl.run_config import ExperimentConfig, TrainConfig

    abl_options = {k[len("abl_"):]: options.pop(k) for k in list(options) if k.startswith("abl_")}
    params = parse_kv(defense_params)
    explicit = {k for k in abl_options
                if ctx.get_parameter_source(f"abl_{k}") is not click.core.ParameterSource.DEFAULT}
    if defense == "abl":
        clash = sorted(explicit & set(params))
        if clash:
            raise click.UsageError(f"ABL parameter(s) {clash} given both as --abl-* options and --defense-param")
        # only the options given: the others come from ABLConfig, where --abl-mode's preset sets them
        params = {**{k: abl_options[k] for k in explicit if abl_options[k] is not None}, **params}
    elif explicit:
        raise click.UsageError(f"--abl-* options need --defense abl (got {', '.join(sorted(explicit))})")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = ExperimentConfig(
        dataset=dataset, attack=None if attack == "none" else attack,
        attack_params={"rate": rate, "target": target, **parse_kv(attack_params)},
        defense=defense, defense_params=params,
        train=TrainConfig(**{k: v for k, v in options.items() if k in train_fields}),
        **{k: v for k, v in options.items() if k not in train_fields},
    )
    if defense == "abl":  # torch-free: a bad knob fails here at once (run_experiment validates the rest first)
        from abl_guard.abl.config import ABLConfig

        ABLConfig.from_train(cfg.train, cfg.defense_params)
    from abl_guard.abl import distributed
    from abl_guard.abl.experiment import run_experiment

    try:  # under torchrun: one DDP process group (NCCL on GPUs, gloo on CPU); rank 0 writes and reports
        with distributed.distributed(device=cfg.train.device) as group:
            record = run_experiment(cfg, out_dir, quiet=ctx.obj["quiet"] or not distributed.is_main())
    except distributed.DistributedError as e:
        raise click.ClickException(str(e)) from e
    if group is not None and not group.is_main:
        return
    if "abl" in record:
        from abl_guard.abl.abl import summary_lines

        for line in summary_lines(record["abl"]):
            click.echo(line)
    if "cleansed" in record:
        c = record["cleansed"]
        click.echo(f"cleansed training set: {c['n']} images without the {c['n_dropped']} ABL removed or held out -> "
                   f"{Path(out_dir) / c['file']} (calibrate --fit-data)")
    m = record["metrics"]
    msg = f"CA {100 * m['clean_accuracy']:.2f}%"
    if "attack_success_rate" in m:
        msg += f"  ASR {100 * m['attack_success_rate']:.2f}%"
    if record.get("test_source", "test split") != "test split":
        msg += f"  (tested on {record['test_source']})"
    click.echo(f"{msg}  ({record['train_seconds']:.0f}s on {record['device']}) -> {Path(out_dir) / 'model.pt'}")



# ------------------------------------------------------------------------------------------------ export


def _parse_numbers(text: str | None, kind: type, option: str) -> list | None:
    try:
        return None if not text else [kind(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {kind.__name__}s, got {text!r}",
                                 param_hint=option) from None


def _load_checkpoint(path: str, device: str = "cpu") -> tuple[Any, dict]:
    """An abl-guard checkpoint, or exit 4 with one line saying why it is not one (torch's own errors span pages)."""
    import pickle

    from abl_guard.abl.checkpoint import load_checkpoint
    from abl_guard.abl.train import select_device

    try:
        return load_checkpoint(path, select_device(device))
    except (ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__).split(". ")[0]
        log.debug("loading %s failed", path, exc_info=e)
        raise InputFileError(f"{path} is not a loadable abl-guard checkpoint: {first}") from e


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
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="With --arch: number of classes.")
@click.option("--input-shape", default=None, metavar="C,H,W", help="With --arch: input shape.")
@click.option("--mean", default=None, metavar="M1,M2,...", help="With --arch: normalisation mean per channel.")
@click.option("--std", default=None, metavar="S1,S2,...", help="With --arch: normalisation std per channel.")
@click.option("--class-names", default=None, help="With --arch: comma-separated class names.")
@click.option("--penultimate", default=None, metavar="MODULE[:in]",
              help="With --arch: where the penultimate features are (default: input of the last Linear).")
@click.option("--opset", type=click.IntRange(min=7), default=18, show_default=True)
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Parity tolerance torch vs onnxruntime.")
def export(checkpoint: str, output: str, taps: tuple[str, ...], arch: str | None, num_classes: int | None,
           input_shape: str | None, mean: str | None, std: str | None, class_names: str | None,
           penultimate: str | None, opset: int, atol: float) -> None:
    """Export a checkpoint to one ONNX file with logits and named taps; verifies parity with onnxruntime."""
    if arch is not None:
        if not (num_classes and input_shape and mean and std):
            raise click.UsageError("--arch needs --num-classes, --input-shape, --mean and --std")
        shape = _parse_numbers(input_shape, int, "--input-shape")
        means, stds = _parse_numbers(mean, float, "--mean"), _parse_numbers(std, float, "--std")
        names = class_names.split(",") if class_names else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise click.UsageError(f"--class-names has {len(names)} names for {num_classes} classes")
    from abl_guard.export import NormalizedModel, build_foreign_model, default_penultimate, export_onnx
    from abl_guard.guard.bundle import sha256_file

    tap_map = _parse_taps(taps)
    source_sha = sha256_file(checkpoint)
    if arch is None:
        model, meta = _load_checkpoint(checkpoint)
        spec = meta["spec"]
        tap_map = tap_map or dict(meta["taps"])
        if "penultimate" not in tap_map:
            tap_map["penultimate"] = meta["taps"].get("penultimate") or default_penultimate(model)
        kwargs = dict(input_shape=spec["input_shape"], class_names=spec["class_names"], mean=spec["mean"],
                      std=spec["std"], tap_root=None)
        extra = {"arch": meta["arch"], "dataset": spec["name"], "source_checkpoint_sha256": source_sha,
                 "training": {k: meta.get(k) for k in ("metrics", "attack", "defense")}}
    else:
        net = build_foreign_model(arch, checkpoint, num_classes)
        model = NormalizedModel(net, means, stds)
        tap_map.setdefault("penultimate", penultimate or default_penultimate(net))
        kwargs = dict(input_shape=shape, class_names=names, mean=means, std=stds, tap_root=net)
        extra = {"arch": arch, "source_checkpoint_sha256": source_sha}
    report = export_onnx(model, output, taps=tap_map, extra_metadata=extra, opset=opset, atol=atol, **kwargs)
    worst = max(report.parity.values())
    click.echo(f"{report.path}: outputs {', '.join(report.outputs)}; parity max |diff| {worst:.2e}; "
               f"sha256 {report.sha256[:16]}")


# ------------------------------------------------------------------------------------------------ adopt


@main.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The adopted .onnx to write (a new file; the original is left as it is).")
@click.option("--list-taps", is_flag=True, help="List the graph's float tensors (candidate taps) with shapes; exit.")
@click.option("--tap", "taps", multiple=True, metavar="[NAME=]TENSOR|NODE",
              help="Also expose a tensor (or a node's first output) as output NAME (repeatable). The penultimate "
                   "features are found automatically; --tap penultimate=TENSOR overrides that choice.")
@click.option("--output-name", "classifier_output", default=None,
              help="The classifier output, when the graph has several 2-D float outputs.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC", "NHW", "flat"]), default=None,
              help="How the graph lays out an image (default: from the input's shape; flat = the (H, W, C) image "
                   "as one row).")
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="Image size, when the graph does not fix it (always for flat inputs).")
@click.option("--input-range", default=None, metavar="LO,HI",
              help="Value range a float input takes before normalisation [default: 0,1; uint8: 0,255].")
@click.option("--mean", default=None, metavar="M1,M2,...",
              help="Normalisation done outside the graph: (x - mean) / std per channel, on the --input-range scale.")
@click.option("--std", default=None, metavar="S1,S2,...", help="With --mean.")
@click.option("--classes", default=None, metavar="A,B,...", help="Class names in output order (comma-separated).")
@click.option("--classes-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Class names, one per line (or a JSON list).")
@click.option("--check-data", multiple=True, metavar="PATH",
              help="Real inputs (what scan takes) for the check that the original outputs are unchanged; the "
                   "first 64 readable ones are used besides random inputs.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Tolerance of the check (plus 1e-5 relative) on float outputs; other outputs must match exactly.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def adopt(model_path: str, output: str | None, list_taps: bool, taps: tuple[str, ...], classifier_output: str | None,
          layout: str | None, input_shape: str | None, input_range: str | None, mean: str | None, std: str | None,
          classes: str | None, classes_file: str | None, check_data: tuple[str, ...], atol: float,
          force: bool) -> None:
    """Make someone else's ONNX classifier guardable: add logits and tap outputs plus the input contract.

    Torch-free. The original outputs stay as they were (checked with onnxruntime on random and --check-data
    inputs; a mismatch refuses to write), a fixed batch axis becomes dynamic, and the metadata records layout,
    dtype, value range, normalisation, size and class names. Then: `abl-guard calibrate OUT.onnx --data CLEAN/`.
    """
    from abl_guard.export.adopt import AdoptError, tap_name
    from abl_guard.export.adopt import adopt as adopt_model
    from abl_guard.export.adopt import list_taps as list_candidates

    if list_taps:
        try:
            cands = list_candidates(model_path)
        except AdoptError as e:
            raise InputFileError(e) from e
        for t in cands:
            role = f"  <- {t.role}" if t.role else ""
            click.echo(f"{t.tensor}\t{t.op} {t.node}\t{t.dtype}{list(t.shape)}{role}")
        return
    if output is None:
        raise click.UsageError("missing option -o/--output (or pass --list-taps)")
    if classes and classes_file:
        raise click.UsageError("--classes and --classes-file are alternatives")
    names = None
    if classes:
        names = [n.strip() for n in classes.split(",")]
    elif classes_file:
        text = Path(classes_file).read_text(encoding="utf-8", errors="replace")
        try:
            loaded = json.loads(text)
            names = [str(n) for n in loaded] if isinstance(loaded, list) else None
        except json.JSONDecodeError:
            names = None
        if names is None:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    tap_map: dict[str, str] = {}
    for t in taps:
        name, sep, ref = t.partition("=")
        tap_map[name if sep else tap_name(t)] = ref if sep else t
    shape = _parse_numbers(input_shape, int, "'--input-shape'")
    if shape is not None and (len(shape) != 3 or min(shape) < 1):
        raise click.BadParameter(f"expected C,H,W, got {input_shape!r}", param_hint="'--input-shape'")
    value_range = _parse_numbers(input_range, float, "'--input-range'")
    if value_range is not None and len(value_range) != 2:
        raise click.BadParameter(f"expected LO,HI, got {input_range!r}", param_hint="'--input-range'")
    try:
        rep = adopt_model(model_path, output, taps=tap_map, output=classifier_output, layout=layout,
                          input_shape=shape, value_range=value_range, mean=_parse_numbers(mean, float, "'--mean'"),
                          std=_parse_numbers(std, float, "'--std'"), class_names=names, check_data=list(check_data),
                          atol=atol, overwrite=force)
    except AdoptError as e:
        raise InputFileError(e) from e
    m = rep.metadata
    worst = max(rep.parity.values()) if rep.parity else 0.0
    click.echo(f"{rep.path}: outputs {', '.join(m['model_outputs'])} unchanged (max |diff| {worst:.2e}) + "
               f"{', '.join(f'{n} <- {rep.taps[n]}' if n in rep.taps else n for n in rep.outputs)}; input "
               f"{m['input_layout']} {m['input_dtype']} {m['input_shape']} range {m['input_range']}; "
               f"{len(m['class_names'])} classes; batch {rep.batch}")


# ------------------------------------------------------------------------------------------------ calibrate


@main.command(params=[config_option()])
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_paths", multiple=True, metavar="PATH",
              help="Clean inputs read exactly as `scan` reads them (folders, image files, .npy/.npz, JSONL; "
                   "repeatable), resized to the model's input. Labels come from class sub-folders, an npz 'labels' "
                   "array or a JSONL 'label' field, else the model's prediction (see --labels).")
@click.option("--labels", "label_mode", type=click.Choice(["auto", "given", "predicted"]), default="auto",
              show_default=True,
              help="With --data: use the source's labels where it has them (auto), require them (given), or take "
                   "the model's predicted label for every input (predicted).")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="A built-in clean labelled set (or a .npz) when no --data is given; imagefolder reads "
                   "--data-root like --data.")
@click.option("--data-root", type=click.Path(), default=None)
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True,
              help="First image of the split to use.")
@click.option("--count", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Number of clean images to use.")
@click.option("--fit-data", "fit_paths", multiple=True, metavar="PATH",
              help="Clean inputs the detectors learn from, instead of the first --fractions part of the calibration "
                   "images: e.g. the training set, a larger reference (read like --data, labels by --labels; "
                   "repeatable). The clean images then give only the calibration / validation parts (the last two "
                   "--fractions) and must be held out from these.")
@click.option("--fit-split", type=click.Choice(["train", "test"]), default=None,
              help="The built-in --dataset's split the detectors learn from (as --fit-data).")
@click.option("--fit-count", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Use the first this many images of --fit-data / --fit-split (they are held in memory with every "
                   "tap's activations while the detectors fit).")
@click.option("--fit-memory", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              metavar="GIB",
              help="Most memory (GiB) the fit pass may hold in images and every tap's activations; beyond it the "
                   "detectors fit on a random subset of the fit images that stays within it (a warning says so).")
@click.option("--fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01, show_default=True,
              help="Target false-positive rate of the guard.")
@click.option("--detectors", "detector_names", default="mahalanobis,knn,gram", show_default=True,
              help="Comma-separated detectors, each optionally with inline parameters (NAME:KEY=VALUE:...). The "
                   "default has the best measured worst-case AUROC over backdoor, adversarial and out-of-distribution "
                   "inputs among the sets that keep >= 0.75x bare onnxruntime throughput "
                   "(bench/results/detect_converged.md, serve.md); its taps adapt to the model's.")
@click.option("--detector-param", "detector_params", multiple=True, metavar="DETECTOR.KEY=VALUE",
              help="Detector hyper-parameter (repeatable), e.g. mahalanobis.ridge=0; a detector named twice in "
                   "--detectors is knn, knn#2, ... (knn#2.tap=pool). A tap can be named by its position in the "
                   "model's tap order, penultimate last: knn#2.tap=@-2 is the tap before the last on any model.")
@click.option("--combine", type=click.Choice(["fisher", "min-p", "cauchy", "hmp", "adaptive"]), default="fisher",
              show_default=True,
              help="How detectors' p-values are combined: Fisher adds evidence across detectors (default; measured "
                   "best on correlated detectors); min-p, Cauchy and the harmonic mean (hmp) follow the smallest "
                   "p-value; adaptive keeps the more surprising of Fisher's and min-p's statistics, each calibrated "
                   "on the clean inputs (flags more when one detector alone sees an input, less when the evidence "
                   "is spread). The threshold is set on the combined p-value.")
@click.option("--mondrian", is_flag=True,
              help="Calibrate per predicted class (each class gets its own threshold and the target FPR).")
@click.option("--fractions", default="0.5,0.3,0.2", show_default=True,
              help="Fit / calibration / validation fractions of the clean images (or three counts).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Bundle directory to write; a name ending in .zip writes a single-file archive.")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.pass_context
def calibrate(ctx: click.Context, model_path: str, data_paths: tuple[str, ...], label_mode: str, dataset: str,
              data_root: str | None, split: str, start: int, count: int, fit_paths: tuple[str, ...],
              fit_split: str | None, fit_count: int, fit_memory: float, fpr: float, detector_names: str,
              detector_params: tuple[str, ...], combine: str, mondrian: bool, fractions: str, seed: int, output: str,
              force: bool) -> None:
    """Fit detectors on clean data and calibrate the guard to a target false-positive rate -> a bundle.

    With --data the clean inputs go through scan's own decoding and resizing, so the guard is calibrated on what it
    will see; unreadable inputs are skipped and counted. Inputs without a label take the model's predicted label:
    class-conditional detectors then model the classes as the model sorts them, and the reported accuracy is
    agreement with those predictions (the false-positive calibration needs no labels).

    The clean images are split (seeded) into fit / calibration / validation parts; the realised false-positive
    rate on the validation part is reported with a Clopper-Pearson 95% interval and stored in the manifest.
    Arguments are checked (detectors and their parameters, fractions, the output) before the model is opened.
    """
    dets = _calibration_detectors(detector_names, detector_params)
    parts = _calibration_fractions(fractions)
    if Path(output).exists() and not force:
        raise OutputConflictError(f"{output} exists; pass --force to replace it")
    from abl_guard.guard.build import EmptyDataError, calibrate_bundle, read_clean_data
    from abl_guard.guard.model import read_metadata

    meta = read_metadata(model_path)
    data_paths, label_mode = _calibration_sources(ctx, data_paths, label_mode, dataset, data_root, split)
    if data_paths:
        try:
            clean = read_clean_data(model_path, data_paths, start=start, count=count, labels=label_mode, meta=meta)
        except EmptyDataError as e:
            raise click.BadParameter(str(e), param_hint="'--data'") from e
    else:
        clean = _dataset_clean_data(dataset, split, data_root, start, count, meta["input_shape"][1:])
    fit = _fit_clean_data(model_path, meta, fit_paths, fit_split, fit_count, label_mode, dataset, data_root)
    provenance = {"calibration_data": clean.provenance, **({"fit_data": fit.provenance} if fit else {})}
    try:
        manifest = calibrate_bundle(
            model_path, clean.images, clean.labels, dets, output, fpr=fpr, combine=combine, mondrian=mondrian,
            seed=seed, overwrite=force, fractions=parts, provenance=provenance,
            fit_images=fit.images if fit else None, fit_labels=fit.labels if fit else None,
            fit_memory=int(fit_memory * 2**30),
        )
    except ValueError as e:
        if fit is None or "fit data" not in str(e):
            raise
        raise click.BadParameter(str(e), param_hint="'--fit-data' / '--fit-split'") from e
    _echo_calibration(output, fpr, manifest, clean)


def _fit_clean_data(model_path: str, meta: dict[str, Any], fit_paths: tuple[str, ...], fit_split: str | None,
                    fit_count: int, label_mode: str, dataset: str, data_root: str | None) -> CleanData | None:
    """``--fit-data`` / ``--fit-split``: the clean images the detectors learn from, or None (a part of the
    calibration images, as before)."""
    from abl_guard.guard.build import EmptyDataError, read_clean_data

    if fit_paths and fit_split:
        raise click.UsageError("give --fit-data or --fit-split, not both")
    if fit_split and dataset == "imagefolder":
        if data_root is None:
            raise click.BadParameter("the imagefolder dataset needs --data-root DIR", param_hint="'--data-root'")
        root = Path(data_root)
        fit_paths, label_mode = (str(root / fit_split if (root / fit_split).is_dir() else root),), "given"
    if fit_paths:
        try:
            return read_clean_data(model_path, fit_paths, count=fit_count, labels=label_mode, meta=meta)
        except EmptyDataError as e:
            raise click.BadParameter(str(e), param_hint="'--fit-data'") from e
    if fit_split:
        return _dataset_clean_data(dataset, fit_split, data_root, 0, fit_count, meta["input_shape"][1:])
    return None


def _calibration_detectors(detector_names: str, detector_params: tuple[str, ...]) -> list[Detector]:
    """``--detectors`` / ``--detector-param`` -> detector objects; usage errors before any model is opened."""
    from abl_guard.detectors import make_detectors

    per_det: dict[str, dict[str, Any]] = {}
    for pair in detector_params:
        det, sep, rest = pair.partition(".")
        if not sep or not det:
            raise click.BadParameter(f"expected DETECTOR.KEY=VALUE, got {pair!r}")
        # only the key's '-' reads as '_': detector names keep theirs (mahalanobis-layers.ridge=0)
        per_det.setdefault(det, {}).update(parse_kv((rest,)))
    # a detector named twice gets instance names knn, knn#2, ... (as in the bundle): knn#2.tap=pool sets the second;
    # --detector-param replaces a parameter written inline (mahalanobis:tap=@0)
    try:
        return make_detectors(detector_names, per_det)
    except (ValueError, TypeError) as e:
        raise click.BadParameter(_one_line(e), param_hint="'--detectors' / '--detector-param'") from e


def _calibration_fractions(fractions: str) -> tuple[float, ...]:
    parts = _parse_numbers(fractions, float, "'--fractions'")
    if parts is None or len(parts) != 3 or min(parts) <= 0:
        raise click.BadParameter(f"expected three positive fractions or counts, got {fractions!r}",
                                 param_hint="'--fractions'")
    return tuple(parts)


def _calibration_sources(ctx: click.Context, data_paths: tuple[str, ...], label_mode: str, dataset: str,
                         data_root: str | None, split: str) -> tuple[tuple[str, ...], str]:
    """``--data`` paths and label mode; the imagefolder dataset is read like ``--data`` (scan's decoding)."""
    given = {k for k in ("dataset", "data_root", "split")
             if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT,
                                                    click.core.ParameterSource.DEFAULT_MAP, None)}
    if data_paths and given:
        raise click.UsageError(f"--data replaces --dataset/--data-root/--split (got {', '.join(sorted(given))})")
    if not data_paths and dataset == "imagefolder":
        if data_root is None:
            raise click.BadParameter("the imagefolder dataset needs --data-root DIR", param_hint="'--data-root'")
        root = Path(data_root)
        return (str(root / split if (root / split).is_dir() else root),), "given"
    return data_paths, label_mode


def _dataset_clean_data(dataset: str, split: str, data_root: str | None, start: int, count: int,
                        size: list[int]) -> CleanData:
    """A built-in labelled set (or a .npz) as calibration data, padded up to the model's ``size`` (H, W)."""
    from abl_guard.abl.data import load_dataset, pad_to
    from abl_guard.guard.build import CleanData

    h, w = size
    data = load_dataset(dataset, split, data_root)
    if data.images.shape[1:3] != (h, w) and data.images.shape[1] < h:
        data = pad_to(data, h)
    data = data.subset(slice(start, start + count))
    if len(data) == 0:
        raise click.BadParameter(f"no images in {dataset}/{split}[{start}:{start + count}]", param_hint="'--start'")
    return CleanData(data.images, data.labels, 0,
                     {"dataset": dataset, "split": split, "start": start, "count": len(data)})


def _echo_calibration(output: str, fpr: float, manifest: dict[str, Any], clean: CleanData) -> None:
    """The calibrate command's report: validation FPR with its interval, accuracy, skipped inputs, per-class FPR."""
    cal = manifest["calibration"]
    v = cal["validation"]
    n, predicted = len(clean.labels), clean.predicted
    click.echo(f"{output}: detectors {', '.join(d['name'] for d in manifest['detectors'])}; combine {cal['combine']}"
               f"{' (Mondrian, per predicted class)' if cal['mondrian'] else ''}; target FPR {fpr:.2%}; validation "
               f"FPR {v['rate']:.2%} (95% CI {v['ci95'][0]:.2%}-{v['ci95'][1]:.2%}, {v['k']}/{v['n']}); "
               + ("clean accuracy n/a (predicted labels)" if predicted == n else
                  f"clean accuracy {v['clean_accuracy']:.2%}"
                  + (f" ({predicted} of {n} labels predicted)" if predicted else "")))
    split = cal["split"]
    if split.get("fit_from") == "fit_images":
        click.echo(f"detectors fitted on {split['fit']} separate clean images; calibrated on "
                   f"{split['calibration']}, validated on {split['validation']}")
    if "fit_offered" in split:
        click.echo(f"detectors fitted on a random {split['fit']} of {split['fit_offered']} fit images to stay "
                   "within --fit-memory", err=True)
    if clean.provenance.get("skipped_unreadable"):
        click.echo(f"skipped {clean.provenance['skipped_unreadable']} unreadable inputs: "
                   f"{clean.provenance['skipped_reasons']}", err=True)
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
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default=None,
              help="Output format (default: from the output name; parquet, a folder of part files, needs --engine "
                   "ray).")
@click.option("--resume", is_flag=True, help="Skip the inputs already in the output file and append the rest.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: Ray Data actors (pip install 'abl-guard[ray]'), same records.")
@click.option("--address", default=None, metavar="ADDR",
              help="With --engine ray: a running cluster ('auto', 'ray://host:10001'); default: start a local one.")
@click.option("--concurrency", type=click.IntRange(1), default=None,
              help="With --engine ray: guard actors (one CPU each; default: the cluster's CPUs minus one).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="Inputs scored at once (at most guard.scan.MAX_BATCH_SIZE).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="onnxruntime intra-op threads (default: all cores).")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None, help="Also write the summary here.")
@click.option("--alarm-alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-3,
              show_default=True, help="Significance of the target-class alarm (Bonferroni-adjusted binomial test).")
@click.option("--fail-on-flag", is_flag=True, help="Exit with status 3 when any input is flagged.")
@click.option("--fail-on-alarm", is_flag=True, help="Exit with status 3 when the target-class alarm fires.")
@click.option("--fail-on-error", is_flag=True, help="Exit with status 1 when any input got an error record.")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Largest image (width x height, read from its header before decoding) scanned; larger ones get "
                   "an error record [default: 40000000].")
@click.option("--max-line-bytes", type=click.IntRange(1), default=None,
              help="Longest JSONL line read; a longer one gets an error record [default: 67108864 (64 MiB)].")
@click.option("--skip-hidden", is_flag=True,
              help="Do not scan hidden files and folders (names starting with '.'); each still gets a "
                   "'skipped: hidden' error record. By default they are scanned like any other.")
@click.pass_context
def scan(ctx: click.Context, bundle: str, inputs: tuple[str, ...], output: str, fmt: str | None, resume: bool,
         engine: str, address: str | None, concurrency: int | None, batch_size: int, threads: int | None,
         summary_json: str | None, alarm_alpha: float, fail_on_flag: bool,
         fail_on_alarm: bool, fail_on_error: bool, max_pixels: int | None, max_line_bytes: int | None,
         skip_hidden: bool) -> None:
    """Scan inputs; exactly one record (verdict or error) per input, in input order.

    INPUTS: image folders (recursive: png/jpg/bmp/webp/...; resized to the model's input with a warning count),
    image files, .npy/.npz arrays, JSONL files (one object per line with "path" or base64 "image", optional "id"),
    and '-' for JSONL on stdin. Ctrl-C stops after the current batch and leaves a valid output; --resume continues.

    The output is locked while it is written and must not be an input, lie inside an input folder or be the bundle.

    Exit status: 0 scan complete; 1 the scan could not run (bad bundle, bad output to resume) or, with
    --fail-on-error, some input got an error record; 2 usage error; 3 with --fail-on-flag / --fail-on-alarm when
    anything is flagged / the alarm fires; 6 the output (or --summary-json) is being written by another scan or
    would overwrite an input or the bundle; 130 interrupted. 3 takes precedence over an opt-in 1.
    """
    from abl_guard.guard import BundleError, Guard
    from abl_guard.guard.scan import ScanError, ScanOutputError, check_output_path, scan_sources
    from abl_guard.guard.sources import SourceLimits

    given = {"max_pixels": max_pixels, "max_line_bytes": max_line_bytes, "skip_hidden": skip_hidden}
    limits = SourceLimits(**{k: v for k, v in given.items() if v is not None})
    if engine == "local":
        if address is not None or concurrency is not None:
            raise click.UsageError("--address and --concurrency need --engine ray")
        if fmt == "parquet" or output.lower().rstrip("/").endswith((".parquet", ".pq")):
            raise click.UsageError("Parquet output is written by --engine ray only")
    elif "-" in inputs:
        raise click.UsageError("--engine ray cannot read stdin ('-'): save the JSONL to a file the workers can read")
    try:
        if summary_json:
            check_output_path(summary_json, [*inputs, output], [bundle], what="--summary-json file")
        if engine == "ray":
            from abl_guard.guard.ray_scan import RayScanConfig, scan_sources_ray

            cfg = RayScanConfig(address=address, concurrency=concurrency, threads=threads or 1,
                                batch_size=batch_size)
            summary = scan_sources_ray(bundle, list(inputs), output, fmt=fmt, resume=resume, cfg=cfg,
                                       quiet=ctx.obj["quiet"], alarm_alpha=alarm_alpha, limits=limits)
        else:
            g = Guard.load(bundle, batch_size=batch_size, intra_op_threads=threads)
            summary = scan_sources(g, list(inputs), output, batch_size=batch_size, quiet=ctx.obj["quiet"],
                                   fmt=fmt, resume=resume, alarm_alpha=alarm_alpha, protect=[bundle], limits=limits)
    except ScanOutputError as e:
        raise OutputConflictError(e) from e
    except (BundleError, ScanError, OSError) as e:
        raise click.ClickException(str(e)) from e
    for line in summary.lines():
        click.echo(line, err=True)
    if summary_json:
        try:
            Path(summary_json).write_text(json.dumps(summary.to_json(), indent=2))
        except OSError as e:
            raise click.ClickException(f"cannot write the summary: {e}") from e
    if summary.interrupted:
        ctx.exit(130)
    if (fail_on_flag and summary.flagged) or (fail_on_alarm and summary.alarm is not None and summary.alarm.fired):
        ctx.exit(3)
    if fail_on_error and summary.errors:
        ctx.exit(1)


# ------------------------------------------------------------------------------------------------ serve

# Defaults mirror guard/service/app.py:ServeConfig (a test keeps them equal); importing it here would load the whole
# runtime for every command.


@main.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every interface.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port; 0 picks a free one (printed at start).")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True,
              help="Most inputs gathered into one model + detector call.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="How long a batch waits to fill once its first request is picked up.")
@click.option("--max-queue", type=click.IntRange(1), default=1024, show_default=True,
              help="Inputs waiting or running; beyond it requests get 503 with Retry-After.")
@click.option("--max-inputs", type=click.IntRange(1), default=256, show_default=True, help="Inputs per request.")
@click.option("--max-body-bytes", type=click.IntRange(1), default=8 * 1024 * 1024, show_default=True,
              help="Largest request body.")
@click.option("--max-pixels", type=click.IntRange(1), default=4096 * 4096, show_default=True,
              help="Largest encoded image (width x height, read from its header before decoding).")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True,
              help="Concurrent connections and requests (503 beyond).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Seconds a request may take before it is answered 504.")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(0), default=30.0, show_default=True,
              help="On SIGTERM, seconds in-flight requests get to finish.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="onnxruntime intra-op threads (default: all cores).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Require 'Authorization: Bearer TOKEN' with the token in this file (else the ABL_GUARD_TOKEN "
                   "environment variable, if set). /healthz, /readyz and /openapi.json stay open.")
@click.option("--access-log", type=click.Path(dir_okay=False), default=None,
              help="JSON-lines access log file (rotated at 100 MiB, 3 kept); default: stderr.")
@click.option("--alarm-window", type=click.IntRange(1), default=1000, show_default=True,
              help="Recent verdicts the stream alarms (in /metrics: target-class alarm conditional on the window's "
                   "prediction mix, drift alarm) look at.")
@click.option("--alarm-alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-3,
              show_default=True, help="Significance of the target-class and drift alarms.")
def serve(bundle: str, token_file: str | None, **options: Any) -> None:
    """Serve a guard bundle over HTTP: POST /v1/inspect and /v1/predict, GET /v1/model, /healthz, /readyz,
    /metrics (Prometheus) and /openapi.json. Concurrent requests are batched into one model call.

    Needs the 'serve' extra (pip install 'abl-guard[serve]'). SIGTERM or Ctrl-C stop accepting connections, answer
    every accepted request, and exit.

    Exit status: 0 stopped by SIGTERM/SIGINT after draining; 1 cannot start (missing extra, bad bundle, address in
    use, unreadable or empty token); 2 usage error.
    """
    import os

    from abl_guard.guard.service import missing_dependencies

    missing = missing_dependencies()
    if missing:
        raise click.ClickException(f"abl-guard serve needs the 'serve' extra (missing {', '.join(missing)}): "
                                   "pip install 'abl-guard[serve]'")
    from abl_guard.guard import BundleError
    from abl_guard.guard.service import ServeConfig
    from abl_guard.guard.service import serve as run_service

    token = None
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise click.ClickException(f"cannot read the token file: {e}") from e
        if not token:
            raise click.ClickException(f"{token_file} holds no token")
    elif os.environ.get("ABL_GUARD_TOKEN"):
        token = os.environ["ABL_GUARD_TOKEN"].strip()
    try:
        config = ServeConfig(token=token, max_buffered_bytes=max(ServeConfig.max_buffered_bytes,
                                                                 options["max_body_bytes"]), **options)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if config.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("serving on %s without a token: anyone who can reach it can use the model", config.host)

    def listening(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"abl-guard serve: listening on http://{shown}:{port} "
                   f"({'bearer token required' if token else 'no authentication'})", err=True)

    try:
        run_service(bundle, config, on_listen=listening)
    except BundleError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"cannot serve on {config.host}:{config.port}: {e}") from e
    click.echo("abl-guard serve: stopped", err=True)


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
    import os

    from abl_guard.guard.report import build_report, write_html, write_png

    if os.path.exists(output) and os.path.samefile(output, verdicts):
        raise click.UsageError(f"-o {output} is the verdict file being reported on; choose another output")
    data = build_report(verdicts, bundle, max_thumbnails=max_thumbnails, alarm_alpha=alarm_alpha)
    out = write_png(data, output) if as_png or output.lower().endswith(".png") else write_html(data, output)
    s = data.summary
    click.echo(f"{out}: {s.total} inputs, {s.flagged} flagged ({s.flag_rate:.2%}), {s.errors} errors"
               + (f"; {s.alarm.message()}" if s.alarm else ""))


# ------------------------------------------------------------------------------------------------ poison


def _model_loader(device: str) -> Any:
    """Reads checkpoint paths given as ``--attack-param model=PATH`` (attacks/ cannot import abl/)."""
    return lambda path: _load_checkpoint(path, device)[0]


@main.command()
@click.option("--attack", required=True, help="badnets, blend, trojan, sig, wanet or label-consistent.")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, digits, cifar10, gtsrb, imagefolder, or a dataset .npz.")
@click.option("--data-root", type=click.Path(), default=None, help="Where the dataset files are.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--rate", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Poisoning rate (fraction of the set).")
@click.option("--target", type=click.IntRange(min=0), default=0, show_default=True, help="Attack target class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--attack-param", "attack_params", multiple=True, metavar="KEY=VALUE",
              help="Extra attack parameter (repeatable), e.g. alpha=0.1, pattern=patch.npy or "
                   "pattern=[[255,0],[0,255]], or model=CKPT for label-consistent.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Poison a random subset of this many images.")
@click.option("--grid", "n_grid", type=click.IntRange(min=1), default=8, show_default=True,
              help="Examples in the PNG grid.")
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

    from abl_guard.abl.data import LabelledImages, load_dataset, peek_num_classes
    from abl_guard.attacks import make_attack
    from abl_guard.attacks.report import example_grid, poison_manifest

    params = {"rate": rate, "target": target, "seed": seed, **parse_kv(attack_params)}
    if isinstance(params.get("model"), str):
        params["model_loader"] = _model_loader(device)
    k = peek_num_classes(dataset, data_root)
    if target >= k:
        raise click.BadParameter(f"{target} is not a class of {dataset} (0..{k - 1})", param_hint="'--target'")
    try:
        atk = make_attack(attack, **params)
    except TypeError as e:  # an unexpected keyword
        raise click.BadParameter(f"{attack}: {e}", param_hint="'--attack-param'") from e
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


def _threads_option() -> click.Option:
    from abl_guard.abl.run_config import ExperimentConfig

    return dataclass_options(ExperimentConfig, ("threads",))[0]


@main.command(params=[_threads_option()])
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--attack", type=click.Choice(["fgsm", "pgd", "cw"]), default="pgd", show_default=True)
@click.option("--dataset", default=None, help="Dataset name or .npz (default: the checkpoint's dataset).")
@click.option("--data-root", type=click.Path(), default=None)
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Attack the first N images (0 = all).")
@click.option("--eps", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="L-inf budget on the [0,1] scale (fgsm/pgd; default 8/255 colour, 0.1 grayscale).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="PGD / CW iterations.")
@click.option("--target-class", type=click.IntRange(min=0), default=None, help="Targeted attack towards this class.")
@click.option("--attack-param", "attack_params", multiple=True, metavar="KEY=VALUE",
              help="Extra parameter (repeatable), e.g. step_size=0.01, c=1, kappa=0, binary_search_steps=5.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="The .npz to write.")
def adversarial(checkpoint: str, attack: str, dataset: str | None, data_root: str | None, split: str, limit: int,
                eps: float | None, steps: int | None, target_class: int | None, attack_params: tuple[str, ...],
                batch_size: int, seed: int, device: str, out_path: str, threads: int | None) -> None:
    """Adversarial examples against a checkpoint; writes an .npz and reports the success rate.

    The .npz holds `images` (uint8, quantised inside the budget; loadable as a dataset), `labels`, `spec`,
    `images_float` (exact float32 NHWC in [0,1]), `success` / `success_uint8`, predictions and indices.
    """
    params = parse_kv(attack_params)
    if eps is not None:
        if attack == "cw":
            raise click.UsageError("--eps does not apply to cw (an L2 attack that minimises the perturbation)")
        params["eps"] = eps
    if steps is not None:
        if attack == "fgsm":
            raise click.UsageError("--steps does not apply to fgsm (a single step)")
        params["steps"] = steps
    if threads is not None and threads < 1:
        raise click.BadParameter(f"must be >= 1, got {threads}", param_hint="'--threads'")
    import numpy as np

    from abl_guard.abl.data import load_dataset, pad_to
    from abl_guard.abl.train import set_cpu_threads
    from abl_guard.attacks.adversarial import evaluate, quantize, run_attack

    set_cpu_threads(threads)
    model, meta = _load_checkpoint(checkpoint, device)
    spec = meta["spec"]
    if target_class is not None:
        if target_class >= len(spec["class_names"]):
            raise click.BadParameter(f"{target_class} is not a class of the model (0..{len(spec['class_names']) - 1})",
                                     param_hint="'--target-class'")
        params["targets"] = target_class
    data = load_dataset(dataset or spec["name"], split, data_root)
    size = int(spec["input_shape"][1])
    if data.images.shape[1] < size:
        data = pad_to(data, size)
    if limit and limit < len(data):
        data = data.subset(np.arange(limit))
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

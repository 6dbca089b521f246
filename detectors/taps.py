"""Which taps a detector reads: resolved at fit time from the taps the model actually has.

A detector built with ``taps=None`` (``tap=None``) adapts to the model: the multi-layer detectors read every tap in
the model's metadata order with ``penultimate`` moved last, the single-layer ones read ``penultimate`` (or, when the
model has none, the last tap). Named taps are checked against the model's, with a one-line error naming the taps
it has — a foreign ONNX file adopted with its own layer names works without knowing the small CNN's. A tap can
also be named by its position in that order, ``"@-2"`` (the tap before the last), which means the same layer on any
model whose taps run from input to output.

Before ``fit`` a detector cannot know the model's taps, so it requires only the logits; ``fit`` and ``score`` fetch
the taps they need through the model callable when the observations lack them (:func:`with_taps`). A fitted
detector requires its resolved taps, so the guard's single forward pass yields them at serving time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .base import ModelFn, Observations

PENULTIMATE = "penultimate"
_NOT_TAPS = ("logits", "input")


def available_taps(reference: Observations, model: ModelFn | None) -> list[str]:
    """The model's taps in metadata order (``model.tap_names``), else the tap-like keys of the observations."""
    names = getattr(model, "tap_names", None)
    if names is not None:
        return [str(t) for t in names]
    return [str(k) for k in reference if k not in _NOT_TAPS]


def resolve_taps(requested: Sequence[str] | None, reference: Observations, model: ModelFn | None,
                 who: str) -> list[str]:
    """``requested`` checked against the model's taps, or (None) every tap, ``penultimate`` last.

    A requested ``"@i"`` is a position in that order (Python indexing: ``"@-1"`` the last tap, ``"@-2"`` the one
    before it), resolved to the tap's name — one spelling for "the layer before the penultimate" on any model.
    """
    have = available_taps(reference, model)
    ordered = [t for t in have if t != PENULTIMATE] + ([PENULTIMATE] if PENULTIMATE in have else [])
    if requested is None:
        if not ordered:
            raise ValueError(f"{who}: the model has no taps (internal activations) to read; export or adopt it with "
                             "taps")
        return ordered
    requested = [_by_position(str(t), ordered, who) for t in requested]
    missing = [t for t in requested if t not in have]
    if missing:
        raise ValueError(f"{who}: the model has no tap {', '.join(map(repr, missing))}; its taps are {have} "
                         f"(name existing taps, or leave the taps unset to use them all)")
    return [str(t) for t in requested]


def _by_position(tap: str, ordered: Sequence[str], who: str) -> str:
    """``"@i"`` -> the ``i``-th tap of ``ordered``; any other name unchanged."""
    if not tap.startswith("@"):
        return tap
    try:
        i = int(tap[1:])
        return ordered[i]
    except (ValueError, IndexError):
        raise ValueError(f"{who}: tap {tap!r} names no position among the model's {len(ordered)} taps {list(ordered)} "
                         f"(use @0 .. @{len(ordered) - 1}, or @-1 for the last)") from None


def resolve_tap(requested: str | None, reference: Observations, model: ModelFn | None, who: str) -> str:
    """One tap: ``requested`` checked, or (None) ``penultimate`` when the model has it, else its last tap."""
    if requested is not None:
        return resolve_taps([requested], reference, model, who)[0]
    return resolve_taps(None, reference, model, who)[-1]


def with_taps(obs: Observations, taps: Sequence[str], model: ModelFn | None, who: str) -> Mapping[str, Any]:
    """``obs`` with every tap in ``taps``: those missing are computed by running ``model`` on ``obs["input"]``."""
    missing = [t for t in taps if t not in obs]
    if not missing:
        return obs
    if model is None or "input" not in obs:
        raise KeyError(f"{who} needs observation(s) {missing}; got {sorted(obs)} (and no model to compute them)")
    x = np.ascontiguousarray(obs["input"], dtype=np.float32)
    try:
        extra = model(x, outputs=tuple(missing))  # type: ignore[call-arg]
    except TypeError:  # a plain ModelFn without the outputs= keyword
        extra = model(x)
    out = dict(obs)
    for t in missing:
        if t not in extra:
            raise KeyError(f"{who}: the model returned no {t!r} (got {sorted(extra)})")
        out[t] = extra[t]
    return out


def parse_taps(taps: str | Sequence[str] | None, none_means: str = "all") -> list[str] | None:
    """A multi-layer detector's ``taps`` parameter: None (resolved at fit), or a list — or a comma-separated string
    from the command line — of distinct tap names."""
    if isinstance(taps, str):
        taps = [t for t in taps.split(",") if t]
    if taps is not None and (not taps or len(set(taps)) != len(taps)):
        raise ValueError(f"taps must be a non-empty list of distinct tap names (or None: {none_means}), got {taps!r}")
    return None if taps is None else [str(t) for t in taps]


def taps_state(taps: Sequence[str]) -> np.ndarray:
    """Resolved taps as a plain (unicode) array for ``state_dict``."""
    return np.array([str(t) for t in taps], dtype=np.str_)

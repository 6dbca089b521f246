"""Detector sets written as text: ``mahalanobis,knn,gram,mahalanobis:tap=@0``.

Each comma-separated item is a registered detector name, optionally followed by ``:key=value`` parameters (values
parsed as JSON when they parse — numbers, booleans, lists — else kept as strings; ``-`` in a key reads as ``_``).
This is how ``abl-guard calibrate --detectors`` and its default are spelled, so a default that needs a parameter
(a second Mahalanobis at the first tap) is one string the help shows, and the benchmarks read the same string.
Values containing ``,`` or ``:`` cannot be written inline; ``--detector-param`` takes those.
"""

from __future__ import annotations

import json
from typing import Any

from .base import REGISTRY, Detector, instance_names, make_detector


def parse_detector_specs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"knn,mahalanobis:tap=@0:ridge=0"`` -> ``[("knn", {}), ("mahalanobis", {"tap": "@0", "ridge": 0})]``.

    Raises ``ValueError`` (one line) on an empty set, an unknown detector or a parameter without ``=``.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, *pairs = (p.strip() for p in item.split(":"))
        if name not in REGISTRY:
            raise ValueError(f"unknown detector {name!r}; choose from {sorted(REGISTRY)}")
        params: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise ValueError(f"expected {name}:KEY=VALUE, got {item!r}")
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
        out.append((name, params))
    if not out:
        raise ValueError(f"no detectors in {text!r}")
    return out


def make_detectors(text: str, overrides: dict[str, dict[str, Any]] | None = None) -> list[Detector]:
    """Detectors from a spec string; ``overrides`` maps instance names (``knn``, ``knn#2``) to parameters that replace
    the inline ones. Raises ``ValueError`` / ``TypeError`` on bad names or parameters."""
    specs = parse_detector_specs(text)
    instances = instance_names([n for n, _ in specs])
    unknown = set(overrides or {}) - set(instances)
    if unknown:
        raise ValueError(f"parameters given for detectors not selected: {sorted(unknown)} (selected: {instances})")
    return [make_detector(n, **{**p, **(overrides or {}).get(i, {})}) for (n, p), i in zip(specs, instances)]

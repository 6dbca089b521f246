"""Guard bundles: a directory with ``manifest.json``, the ONNX model and detector arrays — nothing executable.

Every file is listed in the manifest with its SHA-256; loading verifies each hash and the format version and refuses
with :class:`BundleError` otherwise. Arrays are ``.npz`` files read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_FORMAT = "abl-guard-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"


class BundleError(RuntimeError):
    """A bundle is missing, tampered with, or of an unsupported version."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("abl-guard")
    except Exception:  # noqa: BLE001 - running from a source tree without installation
        return "unknown"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    for k, v in arrays.items():
        if np.asarray(v).dtype == object:
            raise BundleError(f"array {k!r} has dtype object; bundles hold numeric arrays only")
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return sha256_file(path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class BundleWriter:
    """Writes a bundle into a temporary directory and moves it into place on :meth:`commit` (atomic-ish)."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out} exists; pass overwrite=True (--force) to replace it")
        self.tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=self.out.parent if self.out.parent.exists() else None))
        self.files: dict[str, str] = {}

    def add_file(self, src: str | os.PathLike, name: str) -> str:
        dst = self.tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        self.files[name] = sha256_file(dst)
        return self.files[name]

    def add_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> str:
        dst = self.tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.files[name] = save_arrays(dst, arrays)
        return self.files[name]

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` (with format, versions and file hashes added) and move the bundle into place."""
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "package_version": package_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "files": dict(sorted(self.files.items())),
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.tmp), str(self.out))
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_manifest(bundle: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's manifest; with ``verify`` every listed file's SHA-256 is checked."""
    root = Path(bundle)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not a guard bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from e
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{root}: not an abl-guard bundle (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION:
        raise BundleError(f"{root}: bundle format version {version!r} is not supported (this abl-guard reads "
                          f"version {BUNDLE_VERSION}); re-create it with `abl-guard calibrate`")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise BundleError(f"{root}: manifest lists no model file")
    if verify:
        for name, digest in files.items():
            path = (root / name).resolve()
            if root.resolve() not in path.parents:
                raise BundleError(f"{root}: manifest entry {name!r} points outside the bundle")
            if not path.is_file():
                raise BundleError(f"{root}: file {name} listed in the manifest is missing")
            if sha256_file(path) != digest:
                raise BundleError(f"{root}: {name} does not match its SHA-256 in the manifest (tampered or corrupt)")
    return manifest

"""Guard bundles: a directory with ``manifest.json``, the ONNX model and detector arrays — nothing executable.

Every file is listed in the manifest with its SHA-256, and the manifest carries the SHA-256 of its own canonical JSON
(``manifest_sha256``, so an edited threshold is caught too). Loading verifies the format version and every hash and
refuses with :class:`BundleError` otherwise. Arrays are ``.npz`` files read with ``allow_pickle=False``.
These hashes detect corruption and casual tampering; they are not a signature (whoever can rewrite the bundle can
rewrite the hashes) — sign the bundle or the archive with your own tooling where that matters.

A bundle may also travel as one ``.zip`` archive with the same files (:func:`pack_bundle`); :func:`open_bundle`
extracts only the files the manifest lists, checking each against its hash, into a private temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_FORMAT = "abl-guard-bundle"
BUNDLE_VERSION = 2  # 2: manifest_sha256, input spec, predicted labels of the calibration part (Mondrian, alarm)
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
ARCHIVE_SUFFIX = ".zip"


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


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no whitespace), without ``manifest_sha256`` itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).endswith(ARCHIVE_SUFFIX)


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
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.tmp), str(self.out))
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _safe_name(root: Path | str, name: str) -> None:
    parts = Path(name).parts
    if (not name or name.startswith(("/", "\\")) or "\\" in name or ".." in parts or Path(name).is_absolute()
            or name == MANIFEST):
        raise BundleError(f"{root}: manifest entry {name!r} points outside the bundle (or is not a plain relative "
                          f"path)")


def check_manifest(manifest: Any, where: str | os.PathLike) -> dict[str, Any]:
    """Format, version, file list and ``manifest_sha256`` of a parsed manifest; raises :class:`BundleError`."""
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{where}: not an abl-guard bundle (format {fmt!r})")
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION:
        raise BundleError(f"{where}: bundle format version {version!r} is not supported (this abl-guard "
                          f"{package_version()} reads version {BUNDLE_VERSION}); re-create it with "
                          f"`abl-guard calibrate`")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise BundleError(f"{where}: manifest lists no model file")
    for name in files:
        _safe_name(where, name)
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError(f"{where}: {MANIFEST} does not match its manifest_sha256 (edited or corrupt)")
    return manifest


def _parse_manifest(text: str | bytes, where: str | os.PathLike) -> dict[str, Any]:
    try:
        return check_manifest(json.loads(text), where)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON: {e}") from e


def read_manifest(bundle: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's manifest (directory or archive); with ``verify`` every listed file's SHA-256 is
    checked too."""
    root = Path(bundle)
    if root.is_file() and is_archive(root):
        if verify:
            with open_bundle(root) as _:
                pass
        try:
            with zipfile.ZipFile(root) as zf:
                return _parse_manifest(zf.read(MANIFEST), root)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise BundleError(f"{root}: not a readable bundle archive: {e}") from e
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not a guard bundle (no {MANIFEST})")
    manifest = _parse_manifest(mpath.read_bytes(), root)
    if verify:
        for name, digest in manifest["files"].items():
            path = (root / name).resolve()
            if root.resolve() not in path.parents:
                raise BundleError(f"{root}: manifest entry {name!r} points outside the bundle")
            if not path.is_file():
                raise BundleError(f"{root}: file {name} listed in the manifest is missing")
            if sha256_file(path) != digest:
                raise BundleError(f"{root}: {name} does not match its SHA-256 in the manifest (tampered or corrupt)")
    return manifest


@contextlib.contextmanager
def open_bundle(bundle: str | os.PathLike) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(directory, manifest)`` of a verified bundle; an archive is extracted to a temporary directory that is
    removed on exit. Only the files the manifest lists are extracted, each checked against its SHA-256 as it is
    written; links, absolute paths and ``..`` never leave the archive."""
    path = Path(bundle)
    if not (path.is_file() and is_archive(path)):
        yield path, read_manifest(path, verify=True)
        return
    with tempfile.TemporaryDirectory(prefix="abl-guard-bundle-") as tmp:
        root = Path(tmp)
        try:
            with zipfile.ZipFile(path) as zf:
                manifest = _parse_manifest(zf.read(MANIFEST), path)
                members = {i.filename: i for i in zf.infolist()}
                for name, digest in manifest["files"].items():
                    info = members.get(name)
                    if info is None or info.is_dir():
                        raise BundleError(f"{path}: file {name} listed in the manifest is missing from the archive")
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise BundleError(f"{path}: {name} is a symbolic link; bundles hold plain files only")
                    dst = root / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    with zf.open(info) as src, open(dst, "wb") as out:
                        while block := src.read(1 << 20):
                            h.update(block)
                            out.write(block)
                    if h.hexdigest() != digest:
                        raise BundleError(f"{path}: {name} does not match its SHA-256 in the manifest "
                                          f"(tampered or corrupt)")
                (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise BundleError(f"{path}: not a readable bundle archive: {e}") from e
        yield root, manifest


def pack_bundle(bundle_dir: str | os.PathLike, archive: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a verified bundle directory as one ``.zip`` archive (the manifest and the files it lists)."""
    src, dst = Path(bundle_dir), Path(archive)
    if not is_archive(dst):
        raise BundleError(f"archive name must end in {ARCHIVE_SUFFIX}: {dst}")
    if dst.exists() and not overwrite:
        raise BundleError(f"{dst} exists; pass overwrite=True (--force) to replace it")
    manifest = read_manifest(src, verify=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", suffix=ARCHIVE_SUFFIX, dir=dst.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.write(src / MANIFEST, MANIFEST)
            for name in manifest["files"]:
                zf.write(src / name, name)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst

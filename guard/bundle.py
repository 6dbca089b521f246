"""Guard bundles: a directory with ``manifest.json``, the ONNX model and detector arrays — nothing executable.

Every file is listed in the manifest with its SHA-256, and the manifest carries the SHA-256 of its own canonical JSON
(``manifest_sha256``, so an edited threshold is caught too). Loading verifies the format version and every hash and
refuses with :class:`BundleError` otherwise. Arrays are ``.npz`` files read with ``allow_pickle=False``.
These hashes detect corruption and casual tampering; they are not a signature (whoever can rewrite the bundle can
rewrite the hashes) — sign the bundle or the archive with your own tooling where that matters.

A bundle may also travel as one ``.zip`` archive with the same files (:func:`pack_bundle`); :func:`open_bundle`
extracts only the files the manifest lists, checking each against its hash, into a private temporary directory.

Hostile bundles (issue 12) are refused with :class:`BundleError` before they cost much: the sizes in the zip directory
and the manifest are checked against :class:`BundleLimits` (manifest size, member count, total bytes, expansion ratio,
JSON nesting) before anything is extracted or parsed, extraction stops when a member yields more bytes than it
declared, every hash is streamed, and ``.npz`` arrays are checked against their declared sizes before they are
loaded. Every file the loader
opens is resolved by :func:`bundle_file`: a plain relative name listed in ``files`` (so its hash was verified), inside
the bundle directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import math
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from .sources import SourceError, read_npy_header

BUNDLE_FORMAT = "abl-guard-bundle"
BUNDLE_VERSION = 2  # 2: manifest_sha256, input spec, predicted labels of the calibration part (Mondrian, alarm)
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
ARCHIVE_SUFFIX = ".zip"


class BundleError(RuntimeError):
    """A bundle is missing, tampered with, too large, or of an unsupported version."""


@dataclass(frozen=True)
class BundleLimits:
    """What a bundle may cost to open. A calibrated bundle is a model plus a few small arrays, so the defaults leave
    ample room for real ones (raise ``max_total_bytes`` for a model over 2 GiB) while refusing zip bombs early."""

    max_manifest_bytes: int = 1 << 20  #: manifest.json
    max_total_bytes: int = 2 << 30  #: the listed files together (what an archive extracts), and each .npz's arrays
    max_members: int = 1000  #: entries of an archive or an .npz, and files listed in the manifest
    max_depth: int = 64  #: JSON nesting of the manifest
    #: an archive member declaring more than ``ratio_from_bytes`` may expand at most this many times its compressed
    #: size (float weights barely compress; a deflate bomb expands up to ~1000x)
    max_ratio: float = 100.0
    ratio_from_bytes: int = 16 << 20


DEFAULT_LIMITS = BundleLimits()

#: what reading a hostile zip can raise (encrypted members: RuntimeError; unknown compression: NotImplementedError)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
               RuntimeError, zlib.error, lzma.LZMAError)


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
        np.savez(f, allow_pickle=False, **{k: np.asarray(v) for k, v in arrays.items()})
    return sha256_file(path)


def _check_npz(path: Path, limits: BundleLimits) -> None:
    """An ``.npz`` whose arrays fit ``limits``: at most ``max_members`` ``.npy`` members, each header's shape within
    the bytes the member declares, the declared bytes within ``max_total_bytes`` — read from headers only."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise BundleError(f"{path}: {len(infos)} arrays, more than {limits.max_members}")
        total = sum(i.file_size for i in infos)
        if total > limits.max_total_bytes:
            raise BundleError(f"{path}: its arrays declare {total} bytes, more than {limits.max_total_bytes}")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise BundleError(f"{path}: member {info.filename!r} is not an .npy array")
            with zf.open(info) as f:
                try:
                    shape, _, dtype, _ = read_npy_header(f)
                except SourceError as e:  # object arrays, bad magic or versions, oversized headers, bad shapes
                    raise BundleError(f"{path}: {info.filename}: {e}") from e
                if math.prod(shape) * dtype.itemsize > info.file_size:
                    raise BundleError(f"{path}: {info.filename} declares shape {shape}, more than it holds")


def load_arrays(path: Path, limits: BundleLimits | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` written by :func:`save_arrays`, never unpickled, sized by ``limits`` before loading;
    raises :class:`BundleError` on anything else."""
    try:
        _check_npz(path, limits or DEFAULT_LIMITS)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except BundleError:
        raise
    except (*_ZIP_ERRORS, SyntaxError) as e:  # numpy parses .npy headers with ast.literal_eval
        raise BundleError(f"{path}: not a readable array file: {type(e).__name__}: {e}") from e


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


def _safe_name(root: str | os.PathLike, name: Any) -> None:
    """A plain relative POSIX name (no absolute path, ``..``, ``.``, empty part, backslash, NUL) other than the
    manifest's."""
    plain = (isinstance(name, str) and name and "\\" not in name and "\x00" not in name
             and not name.startswith("/") and PurePosixPath(name).as_posix() == name
             and not any(part in ("", ".", "..") for part in name.split("/")))
    if not plain or name == MANIFEST:
        raise BundleError(f"{root}: manifest entry {name!r} points outside the bundle (or is not a plain relative "
                          f"path)")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _depth(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests no deeper than ``limit`` (iterative: never a RecursionError)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def check_manifest(manifest: Any, where: str | os.PathLike, limits: BundleLimits | None = None) -> dict[str, Any]:
    """Format, version, file list and ``manifest_sha256`` of a parsed manifest; raises :class:`BundleError`."""
    limits = limits or DEFAULT_LIMITS
    if not _depth(manifest, limits.max_depth):
        raise BundleError(f"{where}: {MANIFEST} nests deeper than {limits.max_depth} levels")
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{where}: not an abl-guard bundle (format {_short(fmt)})")
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION:
        raise BundleError(f"{where}: bundle format version {_short(version)} is not supported (this abl-guard "
                          f"{package_version()} reads version {BUNDLE_VERSION}); re-create it with "
                          f"`abl-guard calibrate`")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise BundleError(f"{where}: manifest lists no model file")
    if len(files) > limits.max_members:
        raise BundleError(f"{where}: manifest lists {len(files)} files, more than {limits.max_members}")
    for name, digest in files.items():
        _safe_name(where, name)
        if not isinstance(digest, str):
            raise BundleError(f"{where}: manifest entry {name!r} has no SHA-256 text")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError(f"{where}: {MANIFEST} does not match its manifest_sha256 (edited or corrupt)")
    return manifest


def _parse_manifest(text: str | bytes, where: str | os.PathLike, limits: BundleLimits | None = None
                    ) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError, too many digits, deep nesting
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e
    return check_manifest(parsed, where, limits)


def _read_bounded(f: IO[bytes], cap: int, where: str | os.PathLike) -> bytes:
    """At most ``cap`` bytes of ``f``; :class:`BundleError` when it holds more (whatever its size said)."""
    data = f.read(cap + 1)
    if len(data) > cap:
        raise BundleError(f"{where}: {MANIFEST} is larger than {cap} bytes")
    return data


def bundle_file(root: str | os.PathLike, manifest: Mapping[str, Any], name: Any) -> Path:
    """The path of the bundle file that a manifest field (``model.file``, ``calibration.file``, a detector's
    ``state_file``) names: a plain relative name listed in ``files`` — whose SHA-256 :func:`open_bundle` verified —
    that resolves to a regular file inside ``root`` (no link out of it). Every file the loader opens comes from
    here; anything else raises :class:`BundleError`."""
    _safe_name(root, name)
    if name not in manifest.get("files", {}):
        raise BundleError(f"{root}: {name!r} is not among the files the manifest lists and hashes")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, name))
    if not real.startswith(base.rstrip(os.sep) + os.sep):
        raise BundleError(f"{root}: {name} links outside the bundle")
    try:
        regular = stat.S_ISREG(os.stat(real).st_mode)
    except OSError:
        regular = False
    if not regular:
        raise BundleError(f"{root}: file {name} listed in the manifest is missing (or not a regular file)")
    return Path(real)


def _verify_dir(root: Path, manifest: Mapping[str, Any], limits: BundleLimits) -> None:
    """Every listed file of a directory bundle: inside it, a regular file, within the size limit, hash matching."""
    paths = {name: bundle_file(root, manifest, name) for name in manifest["files"]}
    total = sum(p.stat().st_size for p in paths.values())
    if total > limits.max_total_bytes:
        raise BundleError(f"{root}: its files hold {total} bytes, more than {limits.max_total_bytes}")
    for name, path in paths.items():
        if sha256_file(path) != manifest["files"][name]:
            raise BundleError(f"{root}: {name} does not match its SHA-256 in the manifest (tampered or corrupt)")


def _zip_entry_count(f: IO[bytes], where: str | os.PathLike) -> tuple[int, int]:
    """``(entries, central directory bytes)`` from a zip's end record, read before :mod:`zipfile` parses (and holds
    in memory) the whole central directory."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    n = min(size, 22 + 0xFFFF)  # the end record (22 bytes) and at most a 64 KiB comment
    f.seek(size - n)
    tail = f.read(n)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        raise BundleError(f"{where}: not a readable bundle archive: no zip end record")
    entries = int.from_bytes(tail[i + 10 : i + 12], "little")
    cd_size = int.from_bytes(tail[i + 12 : i + 16], "little")
    end = size - n + i
    if end >= 76:  # a zip64 locator right before the end record: zipfile then reads the zip64 record before that
        f.seek(end - 76)
        rec = f.read(76)
        if rec[56:60] == b"PK\x06\x07" and rec[:4] == b"PK\x06\x06":
            entries = int.from_bytes(rec[32:40], "little")
            cd_size = int.from_bytes(rec[40:48], "little")
    return entries, cd_size


def _open_archive_or_fail(path: Path, limits: BundleLimits) -> tuple[zipfile.ZipFile, dict[str, Any]]:
    """:func:`_open_archive`, with whatever a hostile zip raises turned into :class:`BundleError`."""
    try:
        return _open_archive(path, limits)
    except BundleError:
        raise
    except _ZIP_ERRORS as e:
        raise BundleError(f"{path}: not a readable bundle archive: {e}") from e


def _open_archive(path: Path, limits: BundleLimits) -> tuple[zipfile.ZipFile, dict[str, Any]]:
    """The archive opened and its manifest checked, before anything is extracted: entry count and directory size
    from the end record, the manifest's size from the zip directory (and as read), and the listed members' declared
    sizes against ``limits``. The caller closes the :class:`~zipfile.ZipFile`."""
    with open(path, "rb") as f:
        entries, cd_size = _zip_entry_count(f, path)
    if entries > limits.max_members or cd_size > limits.max_members * 1024:
        raise BundleError(f"{path}: the archive has {entries} entries ({cd_size} directory bytes); a bundle has at "
                          f"most {limits.max_members}")
    zf = zipfile.ZipFile(path)
    try:
        if len(zf.infolist()) > limits.max_members:
            raise BundleError(f"{path}: the archive has {len(zf.infolist())} entries; a bundle has at most "
                              f"{limits.max_members}")
        try:
            info = zf.getinfo(MANIFEST)
        except KeyError:
            raise BundleError(f"{path}: not a guard bundle archive (no {MANIFEST})") from None
        if info.file_size > limits.max_manifest_bytes:
            raise BundleError(f"{path}: {MANIFEST} declares {info.file_size} bytes, more than "
                              f"{limits.max_manifest_bytes}")
        with zf.open(info) as src:
            manifest = _parse_manifest(_read_bounded(src, limits.max_manifest_bytes, path), path, limits)
        members = []
        for name in manifest["files"]:
            try:
                member = zf.getinfo(name)
            except KeyError:
                raise BundleError(f"{path}: file {name} listed in the manifest is missing from the archive") from None
            if member.is_dir():
                raise BundleError(f"{path}: file {name} listed in the manifest is missing from the archive")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise BundleError(f"{path}: {name} is a symbolic link; bundles hold plain files only")
            members.append(member)
        total = sum(m.file_size for m in members)
        if total > limits.max_total_bytes:
            raise BundleError(f"{path}: its files declare {total} bytes, more than {limits.max_total_bytes}")
        for m in members:
            if m.file_size > limits.ratio_from_bytes and m.file_size > limits.max_ratio * max(m.compress_size, 1):
                raise BundleError(f"{path}: {m.filename} would expand {m.compress_size} bytes to {m.file_size} "
                                  f"(more than {limits.max_ratio:g}x; a zip bomb?)")
        return zf, manifest
    except BaseException:
        zf.close()
        raise


def _extract(zf: zipfile.ZipFile, name: str, digest: str, dst: Path, where: Path) -> None:
    """Stream one member to ``dst``, hashing as it goes; stops once it yields more bytes than its zip entry declared
    (:mod:`zipfile` already cuts there; the check keeps the promise whatever the library does)."""
    info = zf.getinfo(name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    h, count = hashlib.sha256(), 0
    with zf.open(info) as src, open(dst, "xb") as out:
        while block := src.read(1 << 20):
            count += len(block)
            if count > info.file_size:
                raise BundleError(f"{where}: {name} holds more than the {info.file_size} bytes it declares")
            h.update(block)
            out.write(block)
    if h.hexdigest() != digest:
        raise BundleError(f"{where}: {name} does not match its SHA-256 in the manifest (tampered or corrupt)")


def read_manifest(bundle: str | os.PathLike, verify: bool = True, limits: BundleLimits | None = None
                  ) -> dict[str, Any]:
    """Read and check a bundle's manifest (directory or archive); with ``verify`` every listed file's SHA-256 is
    checked too."""
    limits = limits or DEFAULT_LIMITS
    root = Path(bundle)
    if root.is_file() and is_archive(root):
        if verify:
            with open_bundle(root, limits) as (_, manifest):
                return manifest
        zf, manifest = _open_archive_or_fail(root, limits)
        zf.close()
        return manifest
    try:
        base = os.path.realpath(root)
        mpath = os.path.realpath(os.path.join(base, MANIFEST))
        regular = stat.S_ISREG(os.stat(mpath).st_mode)  # before opening: a FIFO would block the open
    except (OSError, ValueError):  # missing, unreadable, a NUL in the name
        regular = False
    if not regular or os.path.dirname(mpath) != base:
        raise BundleError(f"{root} is not a guard bundle (no {MANIFEST} file in it)")
    try:
        with open(mpath, "rb") as f:
            text = _read_bounded(f, limits.max_manifest_bytes, root)
    except OSError as e:
        raise BundleError(f"{root}: cannot read {MANIFEST}: {e}") from e
    manifest = _parse_manifest(text, root, limits)
    if verify:
        _verify_dir(root, manifest, limits)
    return manifest


@contextlib.contextmanager
def open_bundle(bundle: str | os.PathLike, limits: BundleLimits | None = None
                ) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(directory, manifest)`` of a verified bundle; an archive is extracted to a temporary directory that is
    removed on exit. Sizes are checked against ``limits`` before anything is extracted; only the files the manifest
    lists are extracted, each checked against its SHA-256 as it is written; links, absolute paths and ``..`` never
    leave the archive."""
    limits = limits or DEFAULT_LIMITS
    path = Path(bundle)
    if not (path.is_file() and is_archive(path)):
        yield path, read_manifest(path, verify=True, limits=limits)
        return
    zf, manifest = _open_archive_or_fail(path, limits)
    with zf, tempfile.TemporaryDirectory(prefix="abl-guard-bundle-") as tmp:
        root = Path(tmp)
        try:
            for name, digest in manifest["files"].items():
                _extract(zf, name, digest, root / name, path)
            (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
        except BundleError:
            raise
        except _ZIP_ERRORS as e:
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

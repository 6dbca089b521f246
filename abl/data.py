"""Labelled image datasets as plain arrays.

Every loader returns :class:`LabelledImages`: ``uint8`` images shaped ``(N, H, W, C)``, ``int64`` labels and a
:class:`DatasetSpec` describing the input (shape, normalisation, class names). The spec travels with the trained
checkpoint into the exported ONNX model's metadata, so serving needs no knowledge of the dataset.

Nothing is downloaded: datasets must already be on disk (Fashion-MNIST from the Debian package
``dataset-fashion-mnist``; CIFAR-10 / GTSRB / ImageFolder wherever the user keeps them). scikit-learn ships the
8x8 digits set.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk; the message says how to get it."""


class DatasetError(ValueError):
    """A dataset file is unreadable or not an abl-guard dataset; the message names the file and says why."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a model trained on this data expects as input.

    ``input_shape`` is ``(C, H, W)``. Images are scaled to [0, 1] and then normalised per channel with
    ``mean``/``std``; the exported model applies that normalisation inside the graph.
    """

    name: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DatasetSpec:
        return cls(
            name=str(d["name"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            class_names=tuple(str(v) for v in d["class_names"]),
        )


@dataclass
class LabelledImages:
    """``images``: uint8 ``(N, H, W, C)``; ``labels``: int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray
    spec: DatasetSpec

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N,H,W,C), got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | slice | Sequence[int]) -> LabelledImages:
        return LabelledImages(self.images[index], self.labels[index], self.spec)

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write images, labels and the spec (as JSON text) to an uncompressed ``.npz``; loads without pickle."""
        import json

        np.savez(path, images=self.images, labels=self.labels, spec=np.array(json.dumps(self.spec.to_json())))


# --------------------------------------------------------------------------------------------------- loaders


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(dims))} bytes)")
    return arr.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.exists():
            return cand
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass --data-root DIR holding the IDX files."
    )


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> LabelledImages:
    root = Path(root) if root else FASHION_MNIST_DEFAULT_ROOT
    prefix = {"train": "train", "test": "t10k"}[_check_split(split)]
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))[..., None].copy()
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    spec = DatasetSpec("fashion-mnist", (1, 28, 28), (0.2860,), (0.3530,), FASHION_MNIST_CLASSES)
    return LabelledImages(np.ascontiguousarray(images), labels, spec)


def load_digits(split: str = "train", root: str | os.PathLike | None = None) -> LabelledImages:
    """scikit-learn's 8x8 digits (1,797 images), split 80/20 by a fixed stratified permutation."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    d = _sk_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    idx_train, idx_test = train_test_split(
        np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target
    )
    idx = np.sort(idx_train if _check_split(split) == "train" else idx_test)
    spec = DatasetSpec("digits", (1, 8, 8), (0.3070,), (0.3780,), tuple(str(i) for i in range(10)))
    return LabelledImages(images[idx], d.target[idx].astype(np.int64), spec)


def _torchvision_to_arrays(ds, size: tuple[int, int] | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for img, label in ds:
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        images.append(arr[..., None] if arr.ndim == 2 else arr)
        labels.append(int(label))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None) -> LabelledImages:
    import torchvision

    root = Path(root or os.environ.get("CIFAR10_ROOT", "~/.cache/cifar10")).expanduser()
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=_check_split(split) == "train", download=False)
    except RuntimeError as e:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found under {root} (expects cifar-10-batches-py/). Download it once and pass "
            "--data-root DIR; abl-guard never downloads at run time."
        ) from e
    images = np.asarray(ds.data, dtype=np.uint8)
    spec = DatasetSpec("cifar10", (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES)
    return LabelledImages(images, np.asarray(ds.targets, dtype=np.int64), spec)


def load_gtsrb(split: str = "train", root: str | os.PathLike | None = None) -> LabelledImages:
    import torchvision

    root = Path(root or os.environ.get("GTSRB_ROOT", "~/.cache/gtsrb")).expanduser()
    try:
        ds = torchvision.datasets.GTSRB(str(root), split=_check_split(split), download=False)
    except RuntimeError as e:
        raise DatasetNotFoundError(
            f"GTSRB not found under {root} (expects gtsrb/). Download it once and pass --data-root DIR."
        ) from e
    images, labels = _torchvision_to_arrays(ds, (32, 32), 3)
    spec = DatasetSpec("gtsrb", (3, 32, 32), (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669),
                       tuple(str(i) for i in range(43)))
    return LabelledImages(images, labels, spec)


def load_image_folder(
    split: str = "train", root: str | os.PathLike | None = None, size: int = 32, channels: int = 3
) -> LabelledImages:
    """A torchvision ImageFolder: ``root/<split>/<class>/*.png`` (or ``root/<class>/*`` when no split folder)."""
    import torchvision

    if root is None:
        raise DatasetNotFoundError("the imagefolder dataset needs --data-root DIR (class sub-folders of images)")
    base = Path(root)
    folder = base / split if (base / split).is_dir() else base
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder {folder} does not exist")
    ds = torchvision.datasets.ImageFolder(str(folder))
    images, labels = _torchvision_to_arrays(ds, (size, size), channels)
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.5,), (0.25,))
    spec = DatasetSpec(f"imagefolder:{base.name}", (channels, size, size), mean, std, tuple(ds.classes))
    return LabelledImages(images, labels, spec)


#: the arrays of a two-split dataset .npz (plus ``spec``); a one-split file holds ``images`` / ``labels``
NPZ_SPLIT_KEYS = {split: (f"{split}_images", f"{split}_labels") for split in ("train", "test")}


def npz_splits(path: str | os.PathLike) -> tuple[str, ...]:
    """The splits a dataset ``.npz`` holds: ``("train", "test")`` for ``train_*`` / ``test_*`` arrays, else ``()``
    (one unsplit set of ``images`` / ``labels``, as ``abl-guard poison`` writes)."""
    files = set(_open_npz(path).files)
    return tuple(split for split, keys in NPZ_SPLIT_KEYS.items() if set(keys) <= files)


def _open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"dataset file {path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a zip / .npy, truncated
        raise DatasetError(f"{path}: not a readable .npz dataset ({type(e).__name__}: {e})") from e


def load_npz(path: str | os.PathLike, split: str | None = None) -> LabelledImages:
    """A dataset ``.npz`` (e.g. a poisoned set written by :meth:`LabelledImages.save_npz`); loaded without pickle.

    A file with ``train_images`` / ``train_labels`` / ``test_images`` / ``test_labels`` holds both splits and
    ``split`` picks one (default ``train``); a one-split file (``images`` / ``labels``) is returned whole whatever the
    split — :mod:`abl_guard.abl.experiment` never tests on it silently. Anything else is a :class:`DatasetError`.
    """
    import json

    with _open_npz(path) as z:
        split_keys = NPZ_SPLIT_KEYS[_check_split(split or "train")]
        keys = split_keys if set(split_keys) <= set(z.files) else ("images", "labels")
        missing = {*keys, "spec"} - set(z.files)
        if missing:
            raise DatasetError(f"{path}: not an abl-guard dataset file (missing {sorted(missing)}; expected images, "
                               "labels and spec, or train_/test_ images and labels and spec)")
        try:
            spec = DatasetSpec.from_json(json.loads(str(z["spec"])))
            return LabelledImages(z[keys[0]], z[keys[1]], spec)
        except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:  # bad spec, arrays
            raise DatasetError(f"{path}: invalid dataset file ({type(e).__name__}: {e})") from e


def peek_num_classes(name: str, root: str | os.PathLike | None = None) -> int:
    """The number of classes of dataset ``name`` without loading its images (cheap: checks before any work).

    Raises :class:`DatasetNotFoundError` / :class:`DatasetError` as loading would, for a missing or invalid file.
    """
    import json

    if name.endswith(".npz"):
        with _open_npz(name) as z:
            if "spec" not in z.files:
                raise DatasetError(f"{name}: not an abl-guard dataset file (missing ['spec'])")
            try:
                return len(DatasetSpec.from_json(json.loads(str(z["spec"]))).class_names)
            except (ValueError, KeyError, TypeError) as e:
                raise DatasetError(f"{name}: invalid dataset spec ({type(e).__name__}: {e})") from e
    if name not in LOADERS:
        raise ValueError(_unknown_dataset(name))
    if name == "fashion-mnist":
        _find(Path(root) if root else FASHION_MNIST_DEFAULT_ROOT, "train-labels-idx1-ubyte")
        return len(FASHION_MNIST_CLASSES)
    if name == "imagefolder":
        if root is None:
            raise DatasetNotFoundError("the imagefolder dataset needs --data-root DIR (class sub-folders of images)")
        base = Path(root) / "train" if (Path(root) / "train").is_dir() else Path(root)
        if not base.is_dir():
            raise DatasetNotFoundError(f"image folder {base} does not exist")
        return sum(1 for d in base.iterdir() if d.is_dir())  # as ImageFolder counts
    return {"digits": 10, "cifar10": len(CIFAR10_CLASSES), "gtsrb": 43}[name]


def holdout_split(data: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """A seeded random ``(rest, held_out)`` split with ``round(fraction * N)`` held out (at least 1, at most N - 1)."""
    if not 0.0 < fraction < 1.0 or len(data) < 2:
        raise ValueError(f"cannot hold out {fraction:.0%} of {len(data)} images")
    n = min(len(data) - 1, max(1, int(round(fraction * len(data)))))
    held = np.sort(np.random.default_rng(seed).choice(len(data), n, replace=False))
    return data.subset(np.setdiff1d(np.arange(len(data)), held)), data.subset(held)


LOADERS = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "cifar10": load_cifar10,
    "gtsrb": load_gtsrb,
    "imagefolder": load_image_folder,
}


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _unknown_dataset(name: str) -> str:
    """The message for a dataset name that is none of :data:`LOADERS` (a folder gets the imagefolder spelling)."""
    hint = (f"; a folder of class sub-folders is --dataset imagefolder --data-root {name}" if Path(name).is_dir()
            else "")
    return f"unknown dataset {name!r}; choose from {sorted(LOADERS)} or a .npz path{hint}"


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None) -> LabelledImages:
    """Load ``name`` (one of :data:`LOADERS`, or a path to an abl-guard ``.npz`` dataset) as arrays."""
    if name.endswith(".npz"):
        return load_npz(name, split)
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(_unknown_dataset(name)) from None
    data = loader(split, root)
    log.info("loaded %s/%s: %d images %s", name, split, len(data), data.images.shape[1:])
    return data


def pad_to(data: LabelledImages, size: int) -> LabelledImages:
    """Zero-pad images symmetrically to ``size x size`` (e.g. 28 -> 32 for Fashion-MNIST on a CIFAR ResNet)."""
    h, w = data.images.shape[1:3]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((len(data), size, size, data.images.shape[3]), np.uint8)
    out[:, top : top + h, left : left + w] = data.images
    spec = DatasetSpec(data.spec.name, (data.spec.input_shape[0], size, size), data.spec.mean, data.spec.std,
                       data.spec.class_names)
    return LabelledImages(out, data.labels, spec)

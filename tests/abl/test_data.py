import gzip
import struct

import numpy as np
import pytest

from abl_guard.abl.data import DatasetNotFoundError, LabelledImages, load_dataset, load_fashion_mnist, load_npz, pad_to


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    d = load_fashion_mnist("test", tmp_path)
    assert d.images.shape == (5, 28, 28, 1) and d.images.dtype == np.uint8
    assert np.array_equal(d.images[..., 0], imgs) and np.array_equal(d.labels, labels)
    assert d.spec.input_shape == (1, 28, 28) and d.spec.num_classes == 10 and d.images.flags.writeable


def test_truncated_idx_is_an_error(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("test", tmp_path)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_dataset("cifar10", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet-1k")
    # a folder given as the dataset: the message spells the imagefolder options for it
    with pytest.raises(ValueError, match=f"--dataset imagefolder --data-root {tmp_path}"):
        load_dataset(str(tmp_path))


def test_digits_split_is_deterministic_and_disjoint(digits_train, digits_test):
    assert digits_train.images.shape[1:] == (8, 8, 1)
    assert len(digits_train) + len(digits_test) == 1797
    assert set(np.unique(digits_test.labels)) == set(range(10))
    assert np.array_equal(load_dataset("digits", "test").labels, digits_test.labels)


def test_npz_roundtrip_and_pad(tmp_path, digits_test):
    path = tmp_path / "d.npz"
    digits_test.save_npz(path)
    back = load_npz(path)
    assert np.array_equal(back.images, digits_test.images) and back.spec == digits_test.spec
    padded = pad_to(back, 12)
    assert padded.images.shape[1:3] == (12, 12) and padded.spec.input_shape == (1, 12, 12)
    assert np.array_equal(padded.images[:, 2:10, 2:10], back.images)


def test_labelled_images_validation():
    with pytest.raises(ValueError):
        LabelledImages(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2), None)
    with pytest.raises(ValueError):
        LabelledImages(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3), None)

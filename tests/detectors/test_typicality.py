"""The input lens: the patch-density typicality test flags both tails, round-trips, and never depends on chunking."""

from __future__ import annotations

import numpy as np
import pytest

from abl_guard.detectors import NotFittedError, PatchTypicality, detector_from_state, make_detector
from abl_guard.detectors.typicality import image_patches

#: float64 scores computed in different chunkings agree to this relative tolerance (BLAS may reorder sums)
RTOL = 1e-9


def textured(n: int, seed: int, size: int = 14) -> np.ndarray:
    """Clean stand-ins: a bright rectangle at a random place on a dark ground, with pixel noise (sd 0.05)."""
    rng = np.random.default_rng(seed)
    x = np.full((n, 1, size, size), 0.1)
    for im in x:
        r, c = rng.integers(0, size // 2, 2)
        h, w = rng.integers(3, size // 2, 2)
        im[0, r:r + h, c:c + w] = rng.uniform(0.5, 0.9)
    return np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)


def two_sided_pvalues(cal: np.ndarray, s: np.ndarray) -> np.ndarray:
    c = np.sort(cal)
    lo = (np.searchsorted(c, s, side="right") + 1) / (len(c) + 1)
    hi = (len(c) - np.searchsorted(c, s, side="left") + 1) / (len(c) + 1)
    return np.minimum(1.0, 2 * np.minimum(lo, hi))


@pytest.fixture(scope="module")
def fitted() -> PatchTypicality:
    return make_detector("typicality", patch=7).fit({"input": textured(400, 0)})  # type: ignore[return-value]


def test_tiles_are_the_non_overlapping_patches_row_major_and_the_remainder_is_dropped():
    x = np.arange(2 * 2 * 5 * 5, dtype=np.float64).reshape(2, 2, 5, 5)
    t = image_patches(x, 2)
    assert t.shape == (2, 4, 8)  # a 2x2 grid of tiles (the fifth row and column left out), 2 channels x 2 x 2
    np.testing.assert_array_equal(t[1, 3], np.concatenate([x[1, 0, 2:4, 2:4].ravel(), x[1, 1, 2:4, 2:4].ravel()]))
    with pytest.raises(ValueError, match="smaller than the 7x7 patch"):
        image_patches(x, 7)


def test_noise_is_flagged_in_the_high_tail_and_blank_images_in_the_low(fitted):
    cal = fitted.score({"input": textured(300, 1)})
    clean = two_sided_pvalues(cal, fitted.score({"input": textured(300, 2)}))
    rng = np.random.default_rng(3)
    noise = rng.uniform(0, 1, (50, 1, 14, 14)).astype(np.float32)
    blank = np.full((50, 1, 14, 14), 0.1, np.float32)
    s_noise, s_blank = fitted.score({"input": noise}), fitted.score({"input": blank})
    assert np.all(s_noise > cal.max()) and np.all(s_blank < cal.min())
    assert np.mean(two_sided_pvalues(cal, s_noise) < 0.01) == 1.0
    assert np.mean(two_sided_pvalues(cal, s_blank) < 0.01) == 1.0
    assert np.mean(clean < 0.01) <= 0.03  # about the 1% a calibrated threshold lets through, with sampling slack
    assert fitted.two_sided and fitted.tail_kinds["low"] == "atypically simple"


def test_scores_do_not_depend_on_the_chunking_and_the_state_round_trips(fitted):
    x = textured(37, 4)
    ref = fitted.score({"input": x})
    small = PatchTypicality.from_state({**fitted.get_params(), "chunk_size": 5}, fitted.state_dict())
    np.testing.assert_allclose(small.score({"input": x}), ref, rtol=RTOL)
    again = detector_from_state("typicality", fitted.get_params(), fitted.state_dict())
    np.testing.assert_allclose(again.score({"input": x}), ref, rtol=RTOL)
    state = dict(fitted.state_dict())
    with pytest.raises(ValueError, match="does not match its patch size"):
        PatchTypicality.from_state({**fitted.get_params(), "patch": 4}, state)


def test_the_score_is_the_mean_tile_mahalanobis_distance(fitted):
    x = textured(3, 5)
    tiles = image_patches(x.astype(np.float64), 7) - fitted.mean_
    cov = fitted.chol_ @ fitted.chol_.T
    d2 = np.einsum("nkd,de,nke->nk", tiles, np.linalg.inv(cov), tiles).mean(axis=1)
    np.testing.assert_allclose(fitted.score({"input": x}), d2, rtol=1e-7)


def test_misuse_is_refused_with_a_message():
    with pytest.raises(NotFittedError):
        PatchTypicality().score({"input": textured(2, 0)})
    with pytest.raises(ValueError, match="shrinkage"):
        PatchTypicality(shrinkage=-1)
    with pytest.raises(ValueError, match="singular"):
        PatchTypicality(shrinkage=0).fit({"input": np.zeros((10, 1, 14, 14), np.float32)})
    det = PatchTypicality(patch=7).fit({"input": textured(50, 0)})
    with pytest.raises(ValueError, match="fitted on"):
        det.score({"input": textured(2, 0, size=21)})
    with pytest.raises(ValueError, match="NCHW"):
        det.score({"input": np.zeros((2, 14, 14), np.float32)})


def test_max_patches_subsamples_reproducibly():
    x = {"input": textured(100, 6)}
    a = PatchTypicality(max_patches=50, seed=1).fit(x)
    b = PatchTypicality(max_patches=50, seed=1).fit(x)
    c = PatchTypicality(max_patches=50, seed=2).fit(x)
    np.testing.assert_array_equal(a.mean_, b.mean_)
    assert not np.allclose(a.mean_, c.mean_)


@pytest.mark.parametrize("max_patches", [50, 10**6])
def test_fit_gathers_the_same_tiles_a_chunk_of_images_at_a_time(monkeypatch, max_patches):
    """Fitting gathers its seeded subset chunk by chunk (bounded memory): the tiles are exactly those of tiling every
    image and subsampling the whole, in the same order."""
    import abl_guard.detectors.typicality as typ
    from abl_guard.detectors._util import subsample

    x = textured(60, 7)
    every = image_patches(x, 7).reshape(-1, 49)
    want = every[subsample(len(every), max_patches, 3)].astype(np.float64)
    monkeypatch.setattr(typ, "_CHUNK_ELEMENTS", 500)  # a few images per chunk
    np.testing.assert_array_equal(PatchTypicality(max_patches=max_patches, seed=3)._sampled_tiles(x), want)


def test_a_constant_frame_is_cut_off_so_padding_changes_nothing():
    """A zero-padding frame (constant over every reference image) is found and cut before tiling: fitted and scored
    on padded images, the detector gives the unpadded images' scores; ``crop_frame=False`` tiles the frame too."""
    from abl_guard.detectors.typicality import constant_frame

    x, y = textured(200, 8), textured(20, 9)
    pad = ((0, 0), (0, 0), (3, 2), (1, 4))
    plain = PatchTypicality().fit({"input": x})
    framed = PatchTypicality().fit({"input": np.pad(x, pad)})
    assert framed.frame_ == (3, 2, 1, 4) and plain.frame_ == (0, 0, 0, 0)
    np.testing.assert_allclose(framed.score({"input": np.pad(y, pad)}), plain.score({"input": y}), rtol=RTOL)
    again = PatchTypicality.from_state(framed.get_params(), framed.state_dict())
    np.testing.assert_allclose(again.score({"input": np.pad(y, pad)}), plain.score({"input": y}), rtol=RTOL)
    assert PatchTypicality(crop_frame=False).fit({"input": np.pad(x, pad)}).frame_ == (0, 0, 0, 0)
    # a bundle's frame that leaves less than a tile (or is negative) is refused at load, not at the first scan
    for bad in ((3, 2, 1, 12), (-1, 0, 0, 0), (0, 0, 0)):  # 19 - 1 - 12 = 6 columns: under a 7x7 tile
        with pytest.raises(ValueError, match="malformed frame"):
            PatchTypicality.from_state(framed.get_params(), {**framed.state_dict(), "frame": np.asarray(bad)})
    # a frame that would leave less than a tile is kept, and constant images have no frame to cut
    assert constant_frame(np.pad(x, ((0, 0), (0, 0), (0, 0), (0, 9))), 7) == (0, 0, 0, 9)
    assert constant_frame(np.zeros((3, 1, 14, 14)), 7) == (0, 0, 0, 0)
    assert constant_frame(np.pad(x[:, :, :, :6], ((0, 0), (0, 0), (0, 0), (0, 2))), 7) == (0, 0, 0, 0)

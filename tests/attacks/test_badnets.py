import numpy as np
import pytest

from abl_guard.attacks import BadNets, make_attack


def _data(n=200, h=10, w=10, c=1, k=10, seed=0):
    r = np.random.default_rng(seed)
    return r.integers(0, 200, (n, h, w, c), dtype=np.uint8), r.integers(0, k, n).astype(np.int64)


@pytest.mark.parametrize("c", [1, 3])
def test_poison_fraction_labels_and_patch(c):
    x, y = _data(c=c)
    p = make_attack("badnets", rate=0.1, target=0, seed=1).poison(x, y, 10)
    assert p.images.shape == x.shape and p.images.dtype == np.uint8
    assert len(p.poison_indices) == 20
    assert np.all(p.labels[p.poison_indices] == 0)
    assert np.all(y[p.poison_indices] != 0), "dirty-label poisons come from non-target classes"
    untouched = np.setdiff1d(np.arange(len(x)), p.poison_indices)
    assert np.array_equal(p.images[untouched], x[untouched]) and np.array_equal(p.labels[untouched], y[untouched])
    patch = p.images[p.poison_indices][:, -3:, -3:, :]
    assert np.all(patch[:, 0, 0] == 255) and np.all(patch[:, 0, 1] == 0)
    # only the 3x3 corner changed
    diff = p.images[p.poison_indices].astype(int) != x[p.poison_indices]
    assert not diff[:, :-3, :, :].any() and not diff[:, :, :-3, :].any()


def test_deterministic_by_seed_and_input_untouched():
    x, y = _data()
    x0 = x.copy()
    a = BadNets(seed=3).poison(x, y, 10)
    b = BadNets(seed=3).poison(x, y, 10)
    c = BadNets(seed=4).poison(x, y, 10)
    assert np.array_equal(a.poison_indices, b.poison_indices)
    assert not np.array_equal(a.poison_indices, c.poison_indices)
    assert np.array_equal(x, x0)


def test_triggered_set_excludes_target_and_all2all():
    x, y = _data()
    t = BadNets(target=2).triggered(x, y, 10)
    assert np.all(t.source_labels != 2) and np.all(t.labels == 2) and len(t.images) == np.sum(y != 2)
    a = BadNets(mode="all2all").triggered(x, y, 10)
    assert len(a.images) == len(x) and np.array_equal(a.labels, (y + 1) % 10)


def test_position_and_errors():
    x, y = _data()
    out = BadNets(position="top-left", pattern="white", size=2).apply_trigger(x)
    assert np.all(out[:, :2, :2] == 255)
    with pytest.raises(ValueError):
        BadNets(size=20).apply_trigger(x)
    with pytest.raises(ValueError):
        BadNets(rate=1.5)
    with pytest.raises(ValueError):
        make_attack("nope")
    with pytest.raises(TypeError):
        make_attack("badnets", bogus=1)

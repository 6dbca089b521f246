"""Behaviour shared by every backdoor attack, then each trigger's own signature."""

import numpy as np
import pytest
import torch

from abl_guard.attacks import REGISTRY, SIG, Blend, LabelConsistent, Trojan, WaNet, make_attack
from abl_guard.attacks.label_consistent import corner_trigger
from abl_guard.attacks.trojan import square_mask, watermark_mask

DIRTY = ["badnets", "blend", "trojan", "wanet"]
CLEAN = ["sig", "label-consistent"]


@pytest.fixture
def build(digits_model):
    """make_attack; label-consistent gets the digits model, or a random linear one for other image shapes."""

    def _build(name, shape=(8, 8, 1), **kw):
        if name == "label-consistent":
            torch.manual_seed(0)
            h, w, c = shape
            model = digits_model if shape == (8, 8, 1) else torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(c * h * w, 10))
            kw = {"model": model, "steps": 5, **kw}
        return make_attack(name, **kw)

    return _build


def test_registry_has_all_six():
    assert set(DIRTY + CLEAN) <= set(REGISTRY)


@pytest.mark.parametrize("name", DIRTY + CLEAN)
@pytest.mark.parametrize("shape", [(8, 8, 1), (12, 10, 3)])
def test_poison_contract(name, shape, build, make_images):
    h, w, c = shape
    x, y = make_images(n=200, h=h, w=w, c=c)
    x0 = x.copy()
    atk = build(name, shape, rate=0.05, target=3, seed=1)
    p = atk.poison(x, y, 10)
    assert np.array_equal(x, x0), "the input must not be modified"
    assert p.images.shape == x.shape and p.images.dtype == np.uint8 and p.labels.dtype == np.int64
    idx = p.poison_indices
    assert np.all(np.diff(idx) > 0)
    assert len(idx) == min(10, int(np.sum(y == 3))) if atk.clean_label else len(idx) == 10
    if atk.clean_label:
        assert np.all(y[idx] == 3) and np.array_equal(p.labels, y), "clean-label: target class only, labels kept"
    else:
        assert np.all(y[idx] != 3) and np.all(p.labels[idx] == 3)
        assert np.array_equal(np.delete(p.labels, idx), np.delete(y, idx))
    changed = np.flatnonzero((p.images != x).any(axis=(1, 2, 3)))
    assert np.all(np.isin(idx, changed)), "every poisoned image carries the trigger"
    extra = getattr(p, "cross_indices", np.zeros(0, np.int64))
    assert set(changed) <= set(idx) | set(extra), "nothing else is touched"
    # ASR set: non-target images only, all triggered, labels -> target
    t = atk.triggered(x, y, 10)
    assert np.all(t.source_labels != 3) and np.all(t.labels == 3) and len(t.images) == np.sum(y != 3)
    assert t.images.shape[1:] == x.shape[1:] and t.images.dtype == np.uint8
    assert (t.images != x[t.indices]).any(axis=(1, 2, 3)).mean() > 0.95


@pytest.mark.parametrize("name", DIRTY + CLEAN)
def test_deterministic_by_seed(name, build, make_images):
    x, y = make_images(n=300)
    a = build(name, seed=5).poison(x, y, 10)
    b = build(name, seed=5).poison(x, y, 10)
    c = build(name, seed=6).poison(x, y, 10)
    assert np.array_equal(a.poison_indices, b.poison_indices) and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.poison_indices, c.poison_indices)


def test_all2all_for_dirty_label_and_rejected_for_clean_label(make_images, digits_model):
    x, y = make_images()
    p = Blend(mode="all2all", rate=0.1).poison(x, y, 10)
    assert np.array_equal(p.labels[p.poison_indices], (y[p.poison_indices] + 1) % 10)
    with pytest.raises(ValueError):
        SIG(mode="all2all")
    with pytest.raises(ValueError):
        LabelConsistent(model=digits_model, mode="all2all")


# ----------------------------------------------------------------------------------------------- blend


def test_blend_formula_and_given_image(make_images):
    x, _ = make_images(n=4, h=6, w=6, c=3)
    atk = Blend(alpha=0.2)
    pat = atk.pattern_for(6, 6, 3)
    assert pat.shape == (6, 6, 3) and pat.std() > 50, "a uniform-random pattern"
    expected = np.clip(np.rint(0.8 * x + 0.2 * pat), 0, 255)
    assert np.array_equal(atk.apply_trigger(x), expected.astype(np.uint8))
    # a given RGB image, resized and converted for grayscale inputs
    img = np.zeros((3, 3, 3), np.uint8)
    img[..., 0] = 255
    g, _ = make_images(n=2, h=6, w=6, c=1)
    out = Blend(pattern=img, alpha=0.5).apply_trigger(g)
    assert np.allclose(out, np.rint(0.5 * g + 0.5 * 0.299 * 255), atol=1)
    assert not np.array_equal(Blend(seed=0).pattern_for(6, 6, 1), Blend(seed=1).pattern_for(6, 6, 1))
    assert np.array_equal(Blend(test_alpha=0.5).apply_trigger(x), Blend(alpha=0.5).apply_trigger(x))


def test_blend_pattern_from_file(tmp_path, make_images):
    pat = np.full((4, 4), 200, np.uint8)
    np.save(tmp_path / "p.npy", pat)
    from PIL import Image

    Image.fromarray(pat).save(tmp_path / "p.png")
    x, _ = make_images(n=2, h=8, w=8)
    a = Blend(pattern=str(tmp_path / "p.npy")).apply_trigger(x)
    b = Blend(pattern=str(tmp_path / "p.png")).apply_trigger(x)
    assert np.array_equal(a, b) and np.array_equal(a, np.rint(0.8 * x + 0.2 * 200).astype(np.uint8))
    with pytest.raises(ValueError):
        Blend(pattern=str(tmp_path / "missing.png"))


# ----------------------------------------------------------------------------------------------- sig


def test_sig_is_a_horizontal_sinusoid():
    x = np.full((2, 5, 24, 3), 100, np.uint8)
    out = SIG().apply_trigger(x).astype(float) - 100
    expected = 20 * np.sin(2 * np.pi * np.arange(24) * 6 / 24)
    assert np.allclose(out[0, 3, :, 1], expected, atol=0.5)
    assert np.all(out == out[:, :1]), "constant down each column (varies horizontally only)"
    assert np.allclose(SIG(test_delta=40).apply_trigger(x)[0, 0, :, 0] - 100.0, 2 * expected, atol=0.5)
    ramp = SIG(signal="ramp").apply_trigger(x)[0, 0, :, 0].astype(float) - 100
    assert np.allclose(ramp, 20 * np.arange(24) / 24, atol=0.5)


# ----------------------------------------------------------------------------------------------- wanet


def test_wanet_cross_samples_and_subtle_warp(digits_train):
    x, y = digits_train.images, digits_train.labels
    atk = WaNet(rate=0.1, seed=0)
    p = atk.poison(x, y, 10)
    n = len(p.poison_indices)
    assert len(p.cross_indices) == round(2 * n) and not set(p.cross_indices) & set(p.poison_indices)
    assert np.array_equal(p.labels[p.cross_indices], y[p.cross_indices]), "noise-mode images keep their labels"
    src = x[p.poison_indices].astype(int)
    warp = np.abs(p.images[p.poison_indices].astype(int) - src).mean()
    shift = np.abs(np.roll(src, 1, axis=2) - src).mean()
    assert 0 < warp < 0.5 * shift, "the warp moves pixels by a fraction of a pixel"
    # the noise-mode images are not the backdoor warp
    assert not np.array_equal(p.images[p.cross_indices], atk.apply_trigger(x[p.cross_indices]))
    # no warp at s = 0: identity grid (up to the uint8 round trip)
    assert np.array_equal(WaNet(s=0).apply_trigger(x[:20]), x[:20])


def test_wanet_grid_follows_official_recipe():
    atk = WaNet(k=4, s=0.5, seed=3)
    assert atk.control.shape == (1, 2, 4, 4) and torch.isclose(atk.control.abs().mean(), torch.tensor(1.0,
                                                                                       dtype=torch.float64))
    g = atk.grid(32, 32)
    assert g.shape == (1, 32, 32, 2) and g.abs().max() <= 1
    ident = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="xy"), 2)
    shift = float((g[0].float() - ident).abs().max())
    # offsets s * noise / size, noise = the bicubic upsampling of the control field (which may overshoot a little)
    assert 0 < shift <= 1.25 * 0.5 * float(atk.control.abs().max()) / 32
    assert shift * 31 / 2 < 1, "sub-pixel displacement"
    assert atk.grid(16, 24).shape == (1, 16, 24, 2)


# ----------------------------------------------------------------------------------------------- trojan


@pytest.mark.parametrize("mask", ["watermark", "square"])
def test_trojan_changes_only_the_mask(mask, make_images):
    x, _ = make_images(n=20, h=28, w=28, c=3)
    atk = Trojan(mask=mask)
    m = atk.mask_for(28, 28)
    out = atk.apply_trigger(x)
    assert np.array_equal(out[:, m == 0], x[:, m == 0])
    assert (out[:, m == 1] != x[:, m == 1]).mean() > 0.9
    assert np.all(out[:, m == 1] == out[:1, m == 1]), "the trigger is the same on every image"
    if mask == "square":
        assert m[-7:, -7:].all() and m.sum() == 49


def test_trojan_masks_scale_to_any_size():
    for h, w in [(8, 8), (28, 28), (32, 20)]:
        wm = watermark_mask(h, w)
        assert wm.shape == (h, w) and 0.05 < wm.mean() < 0.5
        assert square_mask(h, w).sum() == max(1, round(0.25 * min(h, w))) ** 2


def test_trojan_trigger_optimisation_drives_the_neuron(digits_model, make_images):
    acts = []
    hook = digits_model.fc1.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
    atk = Trojan(model=digits_model, layer="fc1", steps=100, target_value=50.0)
    x, _ = make_images(n=4, h=8, w=8)
    out = atk.apply_trigger(x)  # optimises lazily for 8x8x1
    neuron = atk.optimisation["neurons"][0]
    w = digits_model.fc1.weight.detach().abs().sum(1)
    assert neuron == int(w.argmax()), "TrojanNN picks the unit with the strongest incoming weights"
    m = torch.as_tensor(atk.mask_for(8, 8), dtype=torch.float32)
    start = torch.as_tensor(atk._initial_pattern(8, 8, 1) / 255, dtype=torch.float32).permute(2, 0, 1)[None]
    acts.clear()
    digits_model(start * m)
    before = float(acts[-1][0, neuron])
    hook.remove()
    assert atk.optimisation["activations"][0] > before + 1.0
    assert np.array_equal(out[:, atk.mask_for(8, 8) == 0], x[:, atk.mask_for(8, 8) == 0])
    assert all(p.grad is None for p in digits_model.parameters()), "the model's gradients are left alone"
    with pytest.raises(ValueError):
        Trojan(model=digits_model)  # no layer


# ----------------------------------------------------------------------------------------------- label-consistent


def test_label_consistent_perturbs_within_eps_then_stamps_corners(digits_model, digits_train):
    x, y = digits_train.images, digits_train.labels
    eps = 32 / 255  # the paper's largest L∞ budget: the 8x8 digits model needs it to be fooled often
    atk = LabelConsistent(model=digits_model, target=0, rate=0.05, eps=eps, steps=20)
    p = atk.poison(x, y, 10)
    idx = p.poison_indices
    assert np.all(y[idx] == 0) and np.array_equal(p.labels, y)
    trig = corner_trigger(8, 8)
    inner = trig == 0
    d = p.images[idx].astype(int) - x[idx].astype(int)
    assert np.abs(d[:, inner]).max() <= 32 and np.abs(d[:, inner]).max() > 0, "PGD within eps off the trigger"
    assert np.all(p.images[idx][:, trig > 0] == 255) and np.all(p.images[idx][:, trig < 0] == 0)
    # the perturbation makes the target images hard for the clean model (before the trigger)
    stats = atk.last_perturbation
    assert stats["clean_model_accuracy_after"] < stats["clean_model_accuracy_before"] - 0.3
    # reduced amplitude: additive +-amplitude
    xs = np.full((1, 8, 8, 1), 100, np.uint8)
    red = LabelConsistent(model=digits_model, amplitude=16 / 255).apply_trigger(xs)[0, ..., 0].astype(int) - 100
    assert np.array_equal(red, (trig * 16).astype(int))


def test_label_consistent_model_argument():
    with pytest.raises(ValueError, match="model"):
        LabelConsistent()
    with pytest.raises(ValueError, match="model_loader"):
        LabelConsistent(model="some/checkpoint.pt")
    loaded = []
    atk = LabelConsistent(model="ckpt.pt", model_loader=lambda p: loaded.append(p) or torch.nn.Identity())
    assert loaded == ["ckpt.pt"] and atk.params()["model"] == "ckpt.pt"


def test_corner_triggers_match_official_layout():
    br = corner_trigger(6, 6, "bottom-right")
    assert br[-1, -1] == 1 and br[-1, -2] == -1 and br[-3, -3] == -1 and br[:3].sum() == 0
    allc = corner_trigger(6, 6)
    assert allc[0, 0] == 1 and allc[0, 1] == -1 and allc[0, 2] == -1 and allc[2, 2] == 1
    assert allc[-3, 2] == -1 and allc[0, -1] == 1 and np.count_nonzero(allc) == 36

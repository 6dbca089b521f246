"""Default taps adapt to the model: ``taps=None`` resolves at fit from the taps the model has (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest

from abl_guard.detectors import NIC, LayerMahalanobis, Mahalanobis, make_detector
from abl_guard.detectors.taps import resolve_tap, resolve_taps, with_taps

K = 3


def _obs(names, n=240, seed=0):
    """Class-clustered activations under arbitrary tap names (a foreign model's layers), plus logits and labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    centres = np.random.default_rng(9)
    obs = {name: (centres.normal(0, 2, (K, 6))[y] + rng.normal(0, 0.5, (n, 6))).astype(np.float32) for name in names}
    obs["logits"] = (5.0 * np.eye(K)[y] + rng.normal(0, 0.3, (n, K))).astype(np.float32)
    return obs, y


class _TapModel:
    """A ModelFn that computes named taps from the input (counts its calls) and lists them like OnnxModel."""

    def __init__(self, names):
        self.tap_names = list(names)
        self.calls = 0

    def __call__(self, x, outputs=None):
        self.calls += 1
        flat = x.reshape(len(x), -1).astype(np.float32)
        out = {t: flat * (i + 1) for i, t in enumerate(self.tap_names)}
        out["logits"] = flat[:, :K]
        return {k: v for k, v in out.items() if outputs is None or k in outputs}


def test_resolution_order_and_errors():
    obs, _ = _obs(["penultimate", "layer2", "layer3"])
    assert resolve_taps(None, obs, None, "x") == ["layer2", "layer3", "penultimate"]
    model = _TapModel(["stem", "penultimate", "layer4"])  # the model's metadata order wins over the dict's
    assert resolve_taps(None, obs, model, "x") == ["stem", "layer4", "penultimate"]
    assert resolve_tap(None, obs, model, "x") == "penultimate"
    assert resolve_tap(None, obs, _TapModel(["a", "b"]), "x") == "b"
    with pytest.raises(ValueError, match=r"no tap 'block1'.*its taps are \['stem', 'penultimate', 'layer4'\]"):
        resolve_taps(["block1", "stem"], obs, model, "NIC")
    with pytest.raises(ValueError, match="no taps"):
        resolve_taps(None, {"logits": obs["logits"]}, None, "NIC")


def test_with_taps_fetches_missing_outputs_through_the_model():
    model = _TapModel(["a", "b"])
    x = np.random.default_rng(0).random((5, 1, 2, 2)).astype(np.float32)
    obs = {"input": x, "logits": np.zeros((5, K)), "a": np.ones((5, 4))}
    out = with_taps(obs, ["a", "b"], model, "d")
    assert model.calls == 1 and np.allclose(out["b"], 2 * x.reshape(5, -1)) and out["a"] is obs["a"]
    assert with_taps(out, ["a", "b"], model, "d") is out and model.calls == 1
    with pytest.raises(KeyError, match="needs observation"):
        with_taps({"logits": obs["logits"]}, ["b"], None, "d")


def test_nic_without_the_small_cnn_taps():
    """NIC's old default named block1..3; a model with other layer names now just works, and the resolved taps
    survive the state round trip."""
    names = ["layer2", "layer3", "penultimate"]
    obs, _ = _obs(["penultimate", "layer2", "layer3"])  # dict order without a model: penultimate moves last
    nic = NIC(max_dim=6, max_samples=240).fit(obs)
    assert nic.taps is None and nic.taps_ == names and nic.requires == (*names, "logits")
    again = NIC.from_state(nic.get_params(), nic.state_dict())
    assert again.taps_ == names
    np.testing.assert_allclose(again.score(obs), nic.score(obs), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no tap 'block1'"):
        NIC(taps=["block1", "layer2"]).fit(obs)


@pytest.mark.parametrize("cls", [Mahalanobis, LayerMahalanobis])
def test_feature_detectors_resolve_and_round_trip(cls):
    obs, y = _obs(["conv", "penultimate"])
    det = cls().fit(obs, y)
    assert det.requires == (("penultimate",) if cls is Mahalanobis else ("conv", "penultimate"))
    again = cls.from_state(det.get_params(), det.state_dict())
    np.testing.assert_allclose(again.score(obs), det.score(obs), rtol=1e-9)
    assert cls().requires == ("logits",)  # unfitted: the taps are not known yet


def test_unfitted_detectors_score_through_the_model_when_taps_are_missing():
    """calibrate_bundle asks for the outputs the detectors require *before* fit (logits only for unset taps); the
    detectors then fetch their taps through the model, at fit and when scoring."""
    model = _TapModel(["t1", "penultimate"])
    rng = np.random.default_rng(1)
    x = rng.random((200, 1, 2, 3)).astype(np.float32)
    y = rng.integers(0, K, 200)
    obs = {"input": x, "logits": model(x, ("logits",))["logits"]}
    det = make_detector("mahalanobis").fit(obs, y, model)
    direct = det.score({"penultimate": model(x)["penultimate"]})
    np.testing.assert_allclose(det.score(obs, model), direct, rtol=1e-9)


def test_knn_resolves_its_tap_and_reads_old_bundles():
    """knn's default tap is resolved at fit like the others: ``penultimate`` when the model has it, else its last tap;
    a state written before (no ``tap`` array, the tap only in the parameters) still loads."""
    from abl_guard.detectors import KNNDistance

    obs, _ = _obs(["conv", "feat"])  # a foreign model: no penultimate
    det = KNNDistance(k=5).fit(obs)
    assert det.tap is None and det.tap_ == "feat" and det.requires == ("feat",)
    assert KNNDistance().requires == ("logits",)
    again = KNNDistance.from_state(det.get_params(), det.state_dict())
    assert again.tap_ == "feat"
    np.testing.assert_allclose(again.score(obs), det.score(obs), rtol=1e-12)
    assert KNNDistance(k=5).fit(_obs(["conv", "penultimate"])[0]).tap_ == "penultimate"
    old = KNNDistance.from_state({"tap": "penultimate", "k": 5}, {"bank": det.bank_})
    assert old.tap_ == "penultimate"
    with pytest.raises(ValueError, match="no tap 'penultimate'"):
        KNNDistance(tap="penultimate", k=5).fit(obs)


def test_taps_by_position_resolve_to_names_on_any_model():
    from abl_guard.detectors import KNNDistance

    obs, y = _obs(["penultimate", "layer2", "layer3"])
    model = _TapModel(["stem", "penultimate", "layer4"])
    assert resolve_taps(["@0", "@-1", "@-2"], obs, model, "x") == ["stem", "penultimate", "layer4"]
    assert resolve_tap("@-2", obs, None, "x") == "layer3"  # observations: metadata order, penultimate last
    with pytest.raises(ValueError, match=r"tap '@3' names no position among the model's 3 taps"):
        resolve_tap("@3", obs, model, "x")
    with pytest.raises(ValueError, match="names no position"):
        resolve_tap("@x", obs, model, "x")
    det = KNNDistance(tap="@-2", k=5).fit(obs, y)
    assert det.tap_ == "layer3" and det.requires == ("layer3",)
    back = make_detector("knn", **det.get_params()).from_state(det.get_params(), det.state_dict())
    np.testing.assert_array_equal(back.score(obs), det.score(obs))
    assert LayerMahalanobis(taps=["@0", "@-1"]).fit(obs, y).taps_ == ["layer2", "penultimate"]

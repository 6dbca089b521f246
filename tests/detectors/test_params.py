"""Detector parameters: ``get_params`` is derived from ``__init__``'s signature for every registered detector, and
NIC resolves its kernel width itself (the value scikit-learn would use)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from abl_guard.detectors import REGISTRY, Detector, make_detector
from abl_guard.detectors.activation import RbfOneClassSVM


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_get_params_lists_every_constructor_argument_and_round_trips(name):
    cls = REGISTRY[name]
    params = make_detector(name).get_params()
    expected = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert list(params) == expected
    json.dumps(params)  # JSON-able: it goes into the bundle manifest
    assert make_detector(name, **params).get_params() == params


def test_get_params_reads_back_non_default_values():
    det = make_detector("knn", tap="block2", k=7, max_bank=None, seed=3, chunk_size=5)
    assert det.get_params() == {"tap": "block2", "k": 7, "max_bank": None, "seed": 3, "chunk_size": 5}
    nic = make_detector("nic", taps=("a", "b"), gamma=0.25)
    assert nic.get_params()["taps"] == ["a", "b"] and nic.get_params()["gamma"] == 0.25


def test_a_detector_must_store_its_parameters_under_their_names():
    class Forgetful(Detector):
        name = "forgetful"

        def __init__(self, width: int = 3, chunk_size: int = 4096) -> None:
            super().__init__(chunk_size)
            self._w = width  # not stored as ``width``

        def fit(self, reference, labels=None, model=None):
            return self

        def score(self, batch, model=None):
            return np.zeros(0)

        def state_dict(self):
            return {}

        def _load_state(self, state):
            pass

    with pytest.raises(AttributeError, match="width"):
        Forgetful().get_params()


@pytest.mark.parametrize("gamma", ["scale", "auto", 0.3])
def test_nic_gamma_is_the_one_scikit_learn_uses(gamma):
    from sklearn.svm import OneClassSVM

    x = np.random.default_rng(0).normal(0, 3, (200, 5)).astype(np.float32)
    ours = RbfOneClassSVM.fit(x, nu=0.1, gamma=gamma)
    theirs = OneClassSVM(kernel="rbf", nu=0.1, gamma=gamma).fit(x)
    assert ours.gamma == pytest.approx(float(theirs._gamma), rel=1e-12)
    assert np.allclose(ours.decision(x), theirs.decision_function(x), atol=1e-6)


def test_nic_gamma_of_constant_features_is_one_and_bad_names_are_refused():
    assert RbfOneClassSVM.resolve_gamma(np.ones((10, 3)), "scale") == 1.0
    with pytest.raises(ValueError, match="gamma"):
        RbfOneClassSVM.resolve_gamma(np.ones((10, 3)), "wide")

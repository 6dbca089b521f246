"""The target-class alarm: fires when flags concentrate on one predicted class, stays quiet on clean streams."""

import numpy as np
import pytest

from abl_guard.guard.calibration import Calibrator, alarm_null, target_class_alarm

K = 5


def simulate(n, rng):
    """Clean scores of two detectors; class 3 is 'hard' (its clean scores run high), so pooled calibration flags
    it more often than the others — the null distribution must account for that."""
    pred = rng.integers(0, K, n)
    z = rng.standard_normal((n, 2)) * np.array([1.0, 1.0, 1.0, 1.8, 1.0])[pred][:, None]
    return {"a": z[:, 0], "b": z[:, 1]}, pred


def fit_parts(rng, combine, mondrian, n):
    """Calibration part (n) and validation part (n / 2), as calibrate_bundle splits them: the calibrator, the
    calibration part's predictions, the clean flagged predictions of both parts and the validation part's flags."""
    s, p = simulate(n, rng)
    cal = Calibrator.fit(s, p, [False, False], combine, 0.01, K, mondrian)
    loo, _, _ = cal.pvalues(s, p, leave_one_out=True)
    vs, vp = simulate(n // 2, rng)
    vc, _, _ = cal.pvalues(vs, vp)
    vflags = vc <= cal.thresholds(vp)
    return cal, p, np.r_[p[loo <= cal.thresholds(p)], vp[vflags]], vflags


def calibrated(rng, mondrian=False, n=3000):
    cal, p, clean_flags, _ = fit_parts(rng, "fisher", mondrian, n)
    return cal, alarm_null(clean_flags, p, K)


def flag_counts(cal, scores, pred):
    comb, _, _ = cal.pvalues(scores, pred)
    flags = comb <= cal.thresholds(pred)
    return np.bincount(pred[flags], minlength=K)


@pytest.mark.parametrize("mondrian", [False, True])
def test_quiet_on_clean_streams(mondrian):
    rng = np.random.default_rng(0)
    cal, (null, method) = calibrated(rng, mondrian)
    assert method == "clean-flags-at-threshold"
    fired = 0
    for _ in range(40):
        counts = flag_counts(cal, *simulate(5000, rng))
        fired += target_class_alarm(counts, null, alpha=1e-3).fired
    assert fired <= 1


def test_pooled_null_needs_the_flag_propensity():
    """With pooled calibration the hard class collects most clean flags: a null that ignores that (the plain
    predicted-label distribution) cries wolf on clean data; the bundle's null does not."""
    rng = np.random.default_rng(1)
    cal, (null, _) = calibrated(rng, mondrian=False)
    assert np.argmax(null) == 3
    naive = np.full(K, 1.0 / K)
    for _ in range(10):
        counts = flag_counts(cal, *simulate(20000, rng))
        assert target_class_alarm(counts, naive).fired and target_class_alarm(counts, naive).target == 3
        assert not target_class_alarm(counts, null).fired


def test_mondrian_needs_the_uncertain_null_too():
    """Even under Mondrian calibration the classes' realised FPRs differ (conformal Beta spread), so treating the
    predicted-label shares as known false-alarms on clean streams; the Dirichlet null does not."""
    rng = np.random.default_rng(0)
    cal, (null, _) = calibrated(rng, mondrian=True)
    known = np.bincount(cal.pred, minlength=K) / cal.n
    naive = quiet = 0
    for _ in range(40):
        counts = flag_counts(cal, *simulate(5000, rng))
        naive += target_class_alarm(counts, known).fired
        quiet += not target_class_alarm(counts, null).fired
    assert naive >= 4 and quiet >= 39


@pytest.mark.parametrize("mondrian", [False, True])
def test_fires_on_a_planted_concentration(mondrian):
    rng = np.random.default_rng(2)
    cal, (null, _) = calibrated(rng, mondrian)
    s, p = simulate(5000, rng)
    # 60 backdoor inputs: predicted as the target class 1 and far off the clean distribution
    s = {k: np.r_[v, rng.normal(6.0, 1.0, 60)] for k, v in s.items()}
    p = np.r_[p, np.ones(60, np.int64)]
    alarm = target_class_alarm(flag_counts(cal, s, p), null, class_names=list("ABCDE"))
    assert alarm.fired and alarm.target == 1 and alarm.target_name == "B"
    assert alarm.flagged_on_target >= 60 and alarm.p_value < 1e-6
    assert "suspected backdoor target: 1" in alarm.message()
    assert alarm.to_json()["per_class"][1]["flagged"] == alarm.flagged_on_target


def test_alarm_needs_enough_flags_and_checks_shapes():
    null = np.full(10, 0.1)  # known shares (sum 1): the binomial test
    few = np.zeros(10, int)
    few[4] = 5  # 5 of 5 flags on one class: significant (p = 10 * 0.1^5), but too few to call
    a = target_class_alarm(few, null, min_flags=6)
    assert not a.fired and a.p_value < 1e-3 and "fewer than the 6" in a.message()
    assert target_class_alarm(few, null, min_flags=5).fired
    assert not target_class_alarm(np.zeros(10, int), null).fired
    with pytest.raises(ValueError):
        target_class_alarm(np.zeros(3, int), null)
    # an uncertain null (few clean flags seen) needs more evidence than a known one
    k = np.zeros(10, int)
    k[2], k[5] = 9, 11
    known = target_class_alarm(k, null, min_flags=1)
    vague = target_class_alarm(k, np.full(10, 0.3), min_flags=1)  # Dirichlet from 3 pseudo-flags
    assert known.p_value < vague.p_value


@pytest.fixture(scope="module")
def backdoor_bundle(tiny_backdoored, tmp_path_factory):
    from abl_guard.detectors import make_detector
    from abl_guard.guard import calibrate_bundle

    t = tiny_backdoored
    out = tmp_path_factory.mktemp("alarm") / "g"
    # calibrate on the clean training images (as the e2e test does); the test split is the fresh stream
    from abl_guard.abl.data import load_dataset

    clean = load_dataset("digits", "train")
    calibrate_bundle(t["onnx"], clean.images, clean.labels, [make_detector("mahalanobis")], out, fpr=0.05,
                     fractions=(0.5, 0.3, 0.2))
    return out


def test_alarm_on_a_real_backdoored_model(backdoor_bundle, tiny_backdoored, tmp_path):
    from abl_guard.guard import Guard
    from abl_guard.guard.scan import scan_sources

    t = tiny_backdoored
    g = Guard.load(backdoor_bundle)
    clean, trig = t["test"].images, t["triggered"].images
    np.save(tmp_path / "clean.npy", clean)
    np.save(tmp_path / "trig.npy", trig[:120])
    quiet = scan_sources(g, [str(tmp_path / "clean.npy")], tmp_path / "clean.jsonl", quiet=True)
    assert quiet.alarm is not None and not quiet.alarm.fired, quiet.alarm.message()
    mixed = scan_sources(g, [str(tmp_path / "clean.npy"), str(tmp_path / "trig.npy")], tmp_path / "mixed.jsonl",
                         quiet=True)
    assert mixed.alarm.fired and mixed.alarm.target == t["attack"].target, mixed.alarm.message()
    assert mixed.to_json()["alarm"]["target"] == t["attack"].target


# ------------------------------------------------------------------------------------------------ stream alarms


def manifest_section(rng, mondrian=False, n=3000):
    """What calibrate_bundle stores: the alarm null, the calibration part's predicted counts, validation flags."""
    cal, p, clean_flags, vflags = fit_parts(rng, "cauchy", mondrian, n)
    null, method = alarm_null(clean_flags, p, K)
    section = {"alarm_null": {"method": method, "dirichlet": [float(a) for a in null]},
               "predicted_class_counts": np.bincount(p, minlength=K).tolist(),
               "validation": {"k": int(vflags.sum()), "n": int(len(vflags))}}
    return cal, section


def stream(cal, scores, pred):
    comb, _, _ = cal.pvalues(scores, pred)
    flags = comb <= cal.thresholds(pred)
    return np.bincount(pred[flags], minlength=K), np.bincount(pred, minlength=K)


def shifted(n, rng, share=0.6, shift=1.0):
    """A clean stream under distribution shift: most inputs predicted as class 2 (not the calibration mix), every
    class's scores raised alike (another camera / dataset)."""
    pred = np.where(rng.random(n) < share, 2, rng.integers(0, K, n))
    z = rng.standard_normal((n, 2)) * np.array([1.0, 1.0, 1.0, 1.8, 1.0])[pred][:, None] + shift
    return {"a": z[:, 0], "b": z[:, 1]}, pred


@pytest.mark.parametrize("mondrian", [False, True])
def test_shifted_clean_stream_is_drift_not_a_backdoor(mondrian):
    from abl_guard.guard.calibration import stream_alarms

    rng = np.random.default_rng(3)
    cal, section = manifest_section(rng, mondrian)
    class_fired = drift_fired = 0
    for _ in range(10):
        flags, preds = stream(cal, *shifted(5000, rng))
        alarm = stream_alarms(flags, preds, section)
        old = target_class_alarm(flags, section["alarm_null"]["dirichlet"])  # the unconditional test
        assert old.fired and old.target == 2  # what the scan used to report: a false backdoor target
        class_fired += alarm.fired
        drift_fired += alarm.drift.fired
        assert alarm.conditional and {t["name"] for t in alarm.drift.tests} == {"flag rate", "prediction mix"}
    assert class_fired == 0 and drift_fired == 10
    assert "DRIFT" in alarm.message() and alarm.to_json()["drift"]["fired"]


def test_clean_stream_in_the_calibration_mix_raises_neither_alarm():
    from abl_guard.guard.calibration import stream_alarms

    rng = np.random.default_rng(4)
    cal, section = manifest_section(rng)
    fired = 0
    for _ in range(20):
        alarm = stream_alarms(*stream(cal, *simulate(5000, rng)), section)
        fired += alarm.fired + alarm.drift.fired
    assert fired <= 1


@pytest.mark.parametrize("share", [0.6, None])
def test_backdoor_stream_fires_the_class_alarm(share):
    """60 triggered inputs (predicted as target 1, off the clean distribution) in a clean stream: the class alarm
    names class 1 whether the clean part is in the calibration mix or shifted."""
    from abl_guard.guard.calibration import stream_alarms

    rng = np.random.default_rng(5)
    cal, section = manifest_section(rng)
    s, p = simulate(5000, rng) if share is None else shifted(5000, rng, share, shift=0.0)
    s = {k: np.r_[v, rng.normal(6.0, 1.0, 60)] for k, v in s.items()}
    p = np.r_[p, np.ones(60, np.int64)]
    alarm = stream_alarms(*stream(cal, s, p), section, class_names=list("ABCDE"))
    assert alarm.fired and alarm.target == 1 and alarm.target_name == "B", alarm.message()
    assert "given the stream's prediction mix" in alarm.message()


def test_drift_alarm_tests_and_malformed_sections():
    from abl_guard.guard.calibration import drift_alarm, stream_alarms

    # 40 flags in 1,000 against 10 in 1,000 clean: the flag-rate test alone fires
    d = drift_alarm(40, 1000, clean_flags=(10, 1000))
    assert d.fired and d.tests[0]["name"] == "flag rate" and d.p_value < 1e-4
    assert not drift_alarm(12, 1000, clean_flags=(10, 1000)).fired
    rng = np.random.default_rng(0)
    same = drift_alarm(0, 0, stream_scores=rng.random(500), calibration_scores=rng.random(900))
    moved = same.with_scores(rng.random(500) ** 3, rng.random(900))
    assert not same.fired and moved.fired and moved.tests[-1]["name"] == "scores"
    # a hand-edited manifest: bad counts are ignored (unconditional class alarm, no mix test), never a crash
    section = {"alarm_null": {"dirichlet": [1.0] * K}, "predicted_class_counts": ["x"] * K,
               "validation": {"k": 5, "n": 2}}
    alarm = stream_alarms([0, 9, 0, 0, 0], [10] * K, section)
    assert not alarm.conditional and alarm.drift.tests == []
    # nothing scored (every input of a scan an error): no test ran, and the message says so in words
    assert drift_alarm(0, 0, clean_flags=(10, 1000)).message() == "no drift alarm (no input scored: no test ran)"
    assert stream_alarms([0] * K, [0] * K, {"alarm_null": None}) is None


def test_an_almost_all_flagged_stream_tilts_but_does_not_concentrate():
    """A heavily shifted stream (96% flagged): one class at 100% is significant but no backdoor concentration; the
    effect-size floor (flags >= 2x expected) keeps the conditional alarm quiet while the drift alarm fires."""
    from abl_guard.guard.calibration import stream_alarms

    preds = np.array([300, 300, 300, 300, 300])
    flags = np.array([300, 282, 285, 284, 288])
    # class 0 is rarely flagged on clean data (low propensity), so its 100% looks concentrated to the null
    section = {"alarm_null": {"dirichlet": [2.0, 60.0, 60.0, 60.0, 60.0]}, "predicted_class_counts": [200] * K,
               "validation": {"k": 10, "n": 1000}}
    alarm = stream_alarms(flags, preds, section)
    assert alarm.p_value < 1e-3 and not alarm.fired and alarm.drift.fired
    assert target_class_alarm(flags, section["alarm_null"]["dirichlet"], predicted_by_class=preds,
                              calibration_counts=[200] * K, min_ratio=1.0).fired

"""Calibration data read through the scan's sources keeps its labels however the path is spelled."""

from __future__ import annotations

import json
import os

import numpy as np

from abl_guard.guard.labelled import read_calibration_data

NAMES = [str(i) for i in range(10)]


def test_npz_and_jsonl_labels_match_relative_and_absolute_paths(tmp_path, monkeypatch, digits_test):
    imgs, labels = digits_test.images[:12], digits_test.labels[:12]
    np.savez(tmp_path / "cal.npz", images=imgs, labels=labels)
    from PIL import Image

    lines = []
    for i in range(3):
        Image.fromarray(imgs[i, ..., 0]).save(tmp_path / f"p{i}.png")
        lines.append(json.dumps({"path": f"p{i}.png", "label": int(labels[i])}))
    (tmp_path / "cal.jsonl").write_text("\r\n".join(lines) + "\n")  # CRLF: numbered as the scan numbers lines
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for src in ("cal.npz", os.path.join(".", "sub", "..", "cal.npz"), str(tmp_path / "cal.npz")):
        data = read_calibration_data([src], (1, 8, 8), NAMES, labels="given")
        np.testing.assert_array_equal(data.labels, labels)
    data = read_calibration_data(["cal.jsonl"], (1, 8, 8), NAMES, labels="given")
    np.testing.assert_array_equal(data.labels, labels[:3])

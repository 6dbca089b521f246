"""`abl-guard serve`: the real CLI in subprocesses on ephemeral loopback ports, driven over HTTP with http.client.

Three servers start together (they take a few seconds each to import the runtime): ``main`` (bearer token from a file,
small limits, 50 ms batching window), ``tight`` (a 4-input queue and a 700 ms window for backpressure, a 2 s timeout;
token from ABL_GUARD_TOKEN) and ``drain`` (a 3 s window, for SIGTERM with requests in flight). A batch waits for its
window only while another request is still arriving, so the tests hold a window open with a half-sent upload.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

TOKEN = "s3cret-token"
RTOL = 1e-5  # scores may differ in the last digits across batch compositions; decisions must not


# ------------------------------------------------------------------------------------------------ harness


class Server:
    def __init__(self, bundle: Path, tmp: Path, name: str, args: list[str], token: str | None = None,
                 env_token: bool = False) -> None:
        self.tmp, self.token = tmp, token
        self.err = tmp / f"{name}.stderr"
        self.access = tmp / f"{name}.access.jsonl"
        cmd = [sys.executable, "-m", "abl_guard.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
               "--threads", "1", "--access-log", str(self.access), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("ABL_GUARD_TOKEN", None)
        if token and env_token:
            env["ABL_GUARD_TOKEN"] = token
        elif token:
            (tmp / f"{name}.token").write_text(token + "\n")
            cmd += ["--token-file", str(tmp / f"{name}.token")]
        self._errf = open(self.err, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._errf, env=env)
        self.port = 0

    def wait_ready(self, timeout: float = 90.0) -> Server:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.err.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.err.read_text(errors='replace')[-2000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                auth: bool = True, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        if auth and self.token:
            h.setdefault("Authorization", f"Bearer {self.token}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: bytes, ctype: str, **kw) -> tuple[int, dict]:
        status, _, data = self.request("POST", path, body, {"Content-Type": ctype, **kw.pop("headers", {})}, **kw)
        return status, json.loads(data)

    def metrics(self) -> dict[str, float]:
        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._errf.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def servers(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    started = {
        "main": Server(tiny_bundle, tmp, "main", ["--max-inputs", "16", "--max-body-bytes", "200000", "--max-pixels",
                                                  "10000", "--max-batch", "8", "--max-wait-ms", "50",
                                                  "--alarm-window", "100"], token=TOKEN),
        "tight": Server(tiny_bundle, tmp, "tight", ["--max-batch", "4", "--max-queue", "4", "--max-inputs", "4",
                                                    "--max-wait-ms", "700", "--timeout", "2"], token=TOKEN,
                        env_token=True),
        "drain": Server(tiny_bundle, tmp, "drain", ["--max-wait-ms", "3000"]),
    }
    try:
        yield {k: s.wait_ready() for k, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def main(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def guard(tiny_bundle):
    from abl_guard.guard import Guard

    return Guard.load(tiny_bundle, intra_op_threads=1)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.squeeze(-1) if img.ndim == 3 else img).save(buf, format="PNG")
    return buf.getvalue()


def multipart(files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, ctype, data in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def assert_same(records: list[dict], expected: list, ids: list[str] | None = None) -> None:
    """Served records vs in-process ``Verdict.to_json()``: decisions exactly, floats within RTOL."""
    assert len(records) == len(expected)
    for i, (r, v) in enumerate(zip(records, expected)):
        e = v.to_json()
        if ids is not None:
            assert r["id"] == ids[i]
        for k in ("label", "class_name", "flagged", "kind"):
            assert r[k] == e[k], (i, k)
        for k in ("confidence", "p_value", "score", "threshold"):
            assert r[k] == pytest.approx(e[k], rel=RTOL, abs=1e-6), (i, k)
        assert r["detectors"].keys() == e["detectors"].keys()
        for d, dv in e["detectors"].items():
            assert r["detectors"][d]["tail"] == dv["tail"]
            assert r["detectors"][d]["p_value"] == pytest.approx(dv["p_value"], rel=RTOL, abs=1e-9)
            assert r["detectors"][d]["score"] == pytest.approx(dv["score"], rel=RTOL)


# ------------------------------------------------------------------------------------------------ endpoints


def test_serving_process_never_loads_torch(main):
    maps = Path(f"/proc/{main.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("no /proc on this system")
    libs = maps.read_text()
    assert "onnxruntime" in libs  # the check can see shared libraries at all
    assert "libtorch" not in libs and "/torch/" not in libs


def test_health_is_open_everything_else_needs_the_token(main):
    assert main.request("GET", "/healthz", auth=False)[0] == 200
    status, _, body = main.request("GET", "/readyz", auth=False)
    assert status == 200 and json.loads(body)["ready"] is True
    assert main.request("GET", "/openapi.json", auth=False)[0] == 200
    before = main.metrics().get('abl_guard_errors_total{reason="unauthorized"}', 0)
    for path in ("/v1/model", "/metrics"):
        status, headers, body = main.request("GET", path, auth=False)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"] == "unauthorized"
    status, _, _ = main.request("POST", "/v1/inspect", npy(np.zeros((8, 8), np.uint8)),
                                {"Content-Type": "application/x-npy", "Authorization": "Bearer wrong"}, auth=False)
    assert status == 401
    status, _, _ = main.request("GET", "/v1/model", headers={"Authorization": f"Basic {TOKEN}"}, auth=False)
    assert status == 401
    assert main.metrics()['abl_guard_errors_total{reason="unauthorized"}'] == before + 4


def test_model_endpoint_reports_the_manifest(main, tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    status, _, body = main.request("GET", "/v1/model")
    info = json.loads(body)
    assert status == 200
    cal, val = info["calibration"], manifest["calibration"]["validation"]
    assert [d["name"] for d in info["detectors"]] == ["mahalanobis"]
    assert cal["fpr_target"] == 0.05 and cal["combine"] == "fisher"
    assert cal["p_threshold"] == manifest["calibration"]["p_threshold"]
    assert cal["validation_fpr"] == val["rate"] and cal["validation_fpr_ci95"] == val["ci95"]
    assert info["model"]["class_names"] == [str(i) for i in range(10)]
    assert info["model"]["sha256"] == manifest["model"]["sha256"]
    assert info["service"]["max_inputs"] == 16 and info["service"]["auth"] is True


def test_openapi_lists_every_endpoint(main):
    doc = json.loads(main.request("GET", "/openapi.json", auth=False)[2])
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/v1/inspect", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics",
                                 "/openapi.json"}
    assert {"image/png", "application/x-npy", "application/json", "multipart/form-data"} <= set(
        doc["paths"]["/v1/inspect"]["post"]["requestBody"]["content"])


def test_inspect_npy_batch_matches_guard(main, guard, digits_test):
    x = digits_test.images[:12]
    status, out = main.post("/v1/inspect", npy(x), "application/x-npy")
    assert status == 200
    assert_same(out["verdicts"], guard.inspect(x), [str(i) for i in range(12)])
    xf = x.transpose(0, 3, 1, 2).astype(np.float32) / 255  # float NCHW is accepted too
    status, out = main.post("/v1/inspect", npy(xf), "application/x-npy")
    assert status == 200
    assert_same(out["verdicts"], guard.inspect(x))


def test_inspect_png_json_and_multipart_match_guard(main, guard, digits_test):
    from abl_guard.guard.sources import decode_image

    x = digits_test.images[20:24]
    big = np.kron(x[0, ..., 0], np.ones((3, 3), np.uint8))  # 24x24: resized to 8x8 like a scanned folder
    expected = guard.inspect(x)

    status, out = main.post("/v1/inspect", png(x[0]), "image/png", headers={"X-Input-ID": "first"})
    assert status == 200
    assert_same(out["verdicts"], expected[:1], ["first"])
    assert "resized" not in out["verdicts"][0]

    body = json.dumps({"inputs": [{"image": base64.b64encode(png(im)).decode(), "id": f"j{i}"}
                                  for i, im in enumerate(x)]}).encode()
    status, out = main.post("/v1/inspect", body, "application/json")
    assert status == 200
    assert_same(out["verdicts"], expected, [f"j{i}" for i in range(4)])

    data_url = "data:image/png;base64," + base64.b64encode(png(big)).decode()
    body, ctype = multipart([("a.png", "image/png", png(x[1])), ("pair.npy", "application/x-npy", npy(x[2:4])),
                             ("big.png", "image/png", png(big))])
    status, out = main.post("/v1/inspect", body, ctype)
    assert status == 200
    big_x, resized = decode_image(png(big), guard.input_shape)
    assert resized
    assert_same(out["verdicts"], [*expected[1:4], *guard.inspect(big_x[None])], ["a.png", "pair.npy#0",
                                                                                 "pair.npy#1", "big.png"])
    assert out["verdicts"][3]["resized"] is True
    status, out = main.post("/v1/inspect", json.dumps({"image": data_url}).encode(), "application/json")
    assert status == 200 and out["verdicts"][0]["resized"] is True


def test_predict_returns_labels_and_flags(main, guard, digits_test):
    rng = np.random.default_rng(1)
    x = np.concatenate([digits_test.images[:6], rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)])
    labels, flagged = guard.predict(x)
    status, out = main.post("/v1/predict", npy(x), "application/x-npy")
    assert status == 200
    preds = out["predictions"]
    assert [p["label"] for p in preds] == labels.tolist()
    assert [p["flagged"] for p in preds] == flagged.tolist()
    assert flagged.any() and not flagged.all()  # the check sees both decisions
    assert set(preds[0]) == {"id", "label", "class_name", "flagged"}


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _forged_npy(shape: tuple[int, ...]) -> bytes:
    """An .npy header declaring ``shape`` over 64 bytes of data."""
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64)


BAD = [
    ("text/plain", b"hello", 415, "unsupported_media_type"),
    ("image/png", b"not an image at all", 400, "undecodable_image"),
    ("image/png", b"", 400, "no_inputs"),
    ("application/x-npy", npy(np.zeros((5, 5), np.uint8)), 422, "invalid_input"),
    ("application/x-npy", npy(np.full((1, 1, 8, 8), np.nan, np.float32)), 422, "invalid_input"),
    ("application/x-npy", npy(np.full((1, 1, 8, 8), 2.0, np.float32)), 422, "invalid_input"),
    ("application/x-npy", npy(np.zeros((2, 8, 8), np.int32)), 422, "invalid_input"),
    ("application/x-npy", npy(np.zeros((4, 8, 8, 1), np.uint8))[:-10], 400, "malformed_npy"),
    ("application/x-npy", _object_npy(), 400, "malformed_npy"),
    ("application/x-npy", b"\x93NUMPY garbage", 400, "malformed_npy"),
    ("application/x-npy", _forged_npy((2**40, 2**40, 8, 8)), 400, "malformed_npy"),
    ("application/x-npy", _forged_npy((2**62, 2**62, 2**62)), 400, "malformed_npy"),
    ("application/x-npy", npy(np.zeros((17, 8, 8, 1), np.uint8)), 413, "too_many_inputs"),
    ("application/json", b"{not json", 400, "bad_json"),
    ("application/json", b"[" * 100_000, 400, "bad_json"),
    ("application/json", b'{"inputs": "x"}', 400, "bad_json"),
    ("application/json", b'{"inputs": []}', 400, "no_inputs"),
    ("application/json", b'{"inputs": [{"image": "@@@"}]}', 400, "bad_base64"),
    ("application/json", json.dumps({"inputs": [{"image": "AAAA"}] * 17}).encode(), 413, "too_many_inputs"),
    ("multipart/form-data", b"--x\r\n", 400, "bad_multipart"),
    ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n"
     b"Content-Type: text/csv\r\n\r\n1,2\r\n--zz--\r\n", 415, "unsupported_media_type"),
    ("application/octet-stream", b"\x00" * 10, 400, "undecodable_image"),
    ("application/x-npy", b"\x00" * 200_001, 413, "body_too_large"),
]


@pytest.mark.parametrize("ctype, body, status, reason", BAD, ids=[f"{r}-{i}" for i, (*_, r) in enumerate(BAD)])
def test_bad_requests_get_a_one_line_4xx(main, ctype, body, status, reason):
    got, out = main.post("/v1/inspect", body, ctype)
    assert (got, out["error"]) == (status, reason), out
    assert out["detail"] and "\n" not in out["detail"] and len(out["detail"]) <= 500
    assert out["request_id"]


def test_an_unrecognised_image_is_named_without_pillows_internals(main):
    status, out = main.post("/v1/inspect", b"not an image at all", "image/png")
    assert (status, out["error"]) == (400, "undecodable_image")
    assert out["detail"] == "input '0': unreadable image: not an image format Pillow reads (or an empty file)", out


def test_too_many_pixels_is_refused_before_decoding(main):
    status, out = main.post("/v1/inspect", png(np.zeros((101, 100), np.uint8)), "image/png")
    assert (status, out["error"]) == (413, "too_many_pixels")
    assert main.post("/v1/inspect", png(np.zeros((100, 100), np.uint8)), "image/png")[0] == 200


def test_no_request_so_far_was_a_server_error(main):
    m = main.metrics()
    assert not [k for k in m if k.startswith("abl_guard_requests_total") and 'code="5' in k]
    assert m['abl_guard_errors_total{reason="invalid_input"}'] >= 4
    assert main.request("GET", "/readyz")[0] == 200


def test_concurrent_requests_share_a_batch(servers, guard, digits_test):
    """While a request is still uploading, the batcher keeps its window (3 s on this server) open for it, so the 8
    concurrent requests that arrive meanwhile share model calls — deterministic however loaded the machine is."""
    srv = servers["drain"]
    before = srv.metrics()
    x = digits_test.images[40:49]
    body = npy(x[8])
    slow = start_upload(srv.port, body, 30)
    time.sleep(0.2)  # the server has read its headers: it counts as arriving
    results: dict[int, tuple[int, dict]] = {}
    go = threading.Barrier(8)

    def one(i: int) -> None:
        go.wait()
        results[i] = srv.post("/v1/inspect", npy(x[i]), "application/x-npy")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slow.sendall(body[30:])
    status, out = read_response(slow)
    slow.close()
    expected = guard.inspect(x)
    assert status == 200
    assert_same(out["verdicts"], expected[8:9])
    for i in range(8):
        assert results[i][0] == 200
        assert_same(results[i][1]["verdicts"], expected[i : i + 1])
    after = srv.metrics()
    calls = after["abl_guard_batch_size_count"] - before.get("abl_guard_batch_size_count", 0)
    assert after["abl_guard_batch_size_sum"] - before.get("abl_guard_batch_size_sum", 0) == 9
    assert calls < 9  # at least two requests went through one model call
    key = 'abl_guard_inputs_total{endpoint="/v1/inspect"}'
    assert after[key] - before.get(key, 0) == 9


def test_request_id_and_access_log(main, digits_test):
    status, headers, body = main.request("POST", "/v1/inspect", npy(digits_test.images[:3]),
                                         {"Content-Type": "application/x-npy", "X-Request-ID": "req-42"})
    assert status == 200 and headers["x-request-id"] == "req-42" and json.loads(body)["request_id"] == "req-42"
    status, headers, _ = main.request("GET", "/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert status == 200 and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", headers["x-request-id"])  # generated instead
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(s) for s in main.access.read_text().splitlines() if s.strip()]
        hit = [e for e in lines if e["request_id"] == "req-42"]
        if hit:
            break
        time.sleep(0.05)
    assert hit and hit[0]["inputs"] == 3 and hit[0]["status"] == 200 and hit[0]["path"] == "/v1/inspect"
    assert hit[0]["latency_ms"] > 0 and "flagged" in hit[0]


def test_metrics_exposition(main):
    status, headers, body = main.request("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("abl_guard_requests_total", "abl_guard_inputs_total", "abl_guard_flagged_total",
                 "abl_guard_errors_total", "abl_guard_request_duration_seconds", "abl_guard_batch_size",
                 "abl_guard_queue_depth", "abl_guard_alarm_fired", "abl_guard_alarm_p_value",
                 "abl_guard_alarm_window_predicted", "abl_guard_drift_alarm_fired", "abl_guard_drift_alarm_p_value"):
        assert f"# TYPE {name} " in text
    m = main.metrics()
    assert m['abl_guard_request_duration_seconds_bucket{endpoint="/v1/inspect",le="+Inf"}'] == m[
        'abl_guard_request_duration_seconds_count{endpoint="/v1/inspect"}']
    assert m["abl_guard_queue_depth"] == 0


def window_counts(m: dict[str, float], names: list[str]) -> tuple[list[int], list[int]]:
    """(flagged, predicted) by class of the service's alarm window, read from /metrics."""
    flagged = [int(m[f'abl_guard_alarm_window_flagged{{class_name="{c}"}}']) for c in names]
    predicted = [int(m[f'abl_guard_alarm_window_predicted{{class_name="{c}"}}']) for c in names]
    return flagged, predicted


def test_target_class_alarm_over_the_window(main, guard, tiny_bundle, digits_test):
    """70 clean inputs, then 30 flagged inputs all predicted as one class: the 100-verdict window alarms on it, with
    the class alarm conditional on the window's prediction mix (as scan runs it) and the drift alarm beside it."""
    from abl_guard.guard.calibration import stream_alarms

    clean = digits_test.images[100:170]
    for s in range(0, 70, 14):
        assert main.post("/v1/predict", npy(clean[s : s + 14]), "application/x-npy")[0] == 200
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3000, 8, 8, 1), dtype=np.uint8)
    labels, flagged = guard.predict(noise)
    cls = int(np.bincount(labels[flagged]).argmax())
    pick = noise[flagged & (labels == cls)][:30]
    assert len(pick) == 30
    for part in (pick[:15], pick[15:]):
        assert main.post("/v1/predict", npy(part), "application/x-npy")[0] == 200
    m = main.metrics()
    assert m["abl_guard_alarm_window_verdicts"] == 100
    counts, predicted = window_counts(m, guard.class_names)
    clean_labels, clean_flags = guard.predict(clean)
    assert predicted == (np.bincount(clean_labels, minlength=10) + 30 * np.eye(10, dtype=int)[cls]).tolist()
    assert counts == (np.bincount(clean_labels[clean_flags], minlength=10) + 30 * np.eye(10, dtype=int)[cls]).tolist()
    cal = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]
    alarm = stream_alarms(counts, predicted, cal, guard.class_names)
    assert alarm is not None and alarm.conditional and alarm.drift is not None
    assert alarm.fired and alarm.target == cls
    assert m["abl_guard_alarm_fired"] == 1 and m["abl_guard_alarm_target_class"] == cls
    assert m["abl_guard_alarm_p_value"] == pytest.approx(alarm.p_value, rel=1e-9)
    assert m["abl_guard_drift_alarm_fired"] == float(alarm.drift.fired)
    assert m["abl_guard_drift_alarm_p_value"] == pytest.approx(alarm.drift.p_value, rel=1e-9, abs=1e-300)


def test_shifted_window_raises_drift_not_class_alarm(main, guard, tiny_bundle, digits_test):
    """A window of inverted digits: nearly everything is flagged and the predictions pile onto a few classes. That is
    drift, not a backdoor: the drift alarm fires, the conditional class alarm does not — while the unconditional
    test the service used before accuses a class on the very same counts."""
    from abl_guard.guard.calibration import target_class_alarm

    shifted = 255 - digits_test.images[100:200]
    for s in range(0, 100, 16):
        assert main.post("/v1/predict", npy(shifted[s : s + 16]), "application/x-npy")[0] == 200
    m = main.metrics()
    assert m["abl_guard_alarm_window_verdicts"] == 100
    counts, predicted = window_counts(m, guard.class_names)
    labels, flags = guard.predict(shifted)
    assert predicted == np.bincount(labels, minlength=10).tolist()
    assert counts == np.bincount(labels[flags], minlength=10).tolist() and sum(counts) >= 90
    assert m["abl_guard_drift_alarm_fired"] == 1 and m["abl_guard_drift_alarm_p_value"] < 1e-3
    assert m["abl_guard_alarm_fired"] == 0 and m["abl_guard_alarm_target_class"] == -1
    null = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]["alarm_null"]["dirichlet"]
    assert target_class_alarm(counts, null, guard.class_names).fired  # the old alarm's false accusation


# ------------------------------------------------------------------------------------------------ limits in time


def start_upload(port: int, body: bytes, sent: int, token: str | None = None) -> socket.socket:
    """A request whose body is only partly sent: it counts as arriving, so the batcher holds its window open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    s.sendall(b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n" + auth
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
    return s


def read_response(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    n = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < n:
        chunk = s.recv(65536)
        assert chunk, "connection closed before the whole answer"
        rest += chunk
    return int(head[9:12]), json.loads(rest[:n])


def wait_for(server: Server, metric: str, value: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()[metric] != value:
        assert time.monotonic() < deadline, f"{metric} never reached {value}"
        time.sleep(0.01)


def test_full_queue_answers_503_with_retry_after(servers, digits_test):
    tight = servers["tight"]
    assert tight.request("GET", "/v1/model", auth=False)[0] == 401  # token from ABL_GUARD_TOKEN
    slow = start_upload(tight.port, npy(digits_test.images[:1]), 20, TOKEN)  # holds the 700 ms window open
    try:
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=tight.post("/v1/inspect", npy(digits_test.images[:3]),
                                                                       "application/x-npy")))
        t.start()
        wait_for(tight, "abl_guard_queue_depth", 3)  # 3 of 4 places taken, waiting for the batch to fill
        status, headers, body = tight.request("POST", "/v1/inspect", npy(digits_test.images[3:5]),
                                              {"Content-Type": "application/x-npy"})
        assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"] == "overloaded"
        t.join()
        assert first["r"][0] == 200 and len(first["r"][1]["verdicts"]) == 3  # the accepted request is answered
    finally:
        slow.close()
    m = tight.metrics()
    assert m['abl_guard_errors_total{reason="overloaded"}'] == 1


def test_stalled_upload_times_out_with_504(servers, digits_test):
    tight = servers["tight"]
    t0 = time.monotonic()
    with start_upload(tight.port, npy(digits_test.images[:1]), 20, TOKEN) as s:
        status, out = read_response(s)
    assert (status, out["error"]) == (504, "timeout")
    assert 1.9 < time.monotonic() - t0 < 10
    wait_for(tight, 'abl_guard_errors_total{reason="timeout"}', 1)
    assert tight.metrics()["abl_guard_queue_depth"] == 0


def test_a_lone_request_does_not_wait_for_the_batching_window(servers, digits_test):
    drain = servers["drain"]  # its window is 3 s
    t0 = time.monotonic()
    assert drain.post("/v1/predict", npy(digits_test.images[:2]), "application/x-npy")[0] == 200
    assert time.monotonic() - t0 < 1.5


def test_sigterm_drains_in_flight_requests_and_exits_0(servers, guard, digits_test):
    """SIGTERM while one request is still uploading and three wait in the batching window: all four are answered,
    then the server exits 0 and the port is closed."""
    drain = servers["drain"]
    x = digits_test.images[60:64]
    body = npy(x[3])
    slow = start_upload(drain.port, body, 30)
    results: dict[int, tuple[int, dict]] = {}

    def one(i: int) -> None:
        results[i] = drain.post("/v1/inspect", npy(x[i]), "application/x-npy")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_for(drain, "abl_guard_queue_depth", 3)
    drain.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    slow.sendall(body[30:])  # the rest of the upload arrives after SIGTERM
    status, out = read_response(slow)
    slow.close()
    for t in threads:
        t.join()
    assert drain.proc.wait(30) == 0
    expected = guard.inspect(x)
    assert status == 200
    assert_same(out["verdicts"], expected[3:4])
    for i in range(3):
        assert results[i][0] == 200
        assert_same(results[i][1]["verdicts"], expected[i : i + 1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", drain.port), timeout=2).close()
    assert "stopped" in drain.err.read_text()


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_defaults_mirror_serve_config():
    from abl_guard.cli import serve
    from abl_guard.guard.service import ServeConfig

    cfg = ServeConfig()
    checked = 0
    for p in serve.params:
        if hasattr(cfg, p.name) and p.name != "token":
            assert p.default == getattr(cfg, p.name), p.name
            checked += 1
    assert checked >= 15


def test_cli_refuses_bad_settings_in_one_line(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from abl_guard.cli import main as cli

    r = CliRunner().invoke(cli, ["serve", str(tiny_bundle), "--max-inputs", "10", "--max-queue", "5"])
    assert r.exit_code == 2 and "max_inputs (10) cannot exceed max_queue (5)" in r.output
    empty = tmp_path / "token"
    empty.write_text("\n")
    r = CliRunner().invoke(cli, ["serve", str(tiny_bundle), "--token-file", str(empty)])
    assert r.exit_code == 1 and "holds no token" in r.output and "Traceback" not in r.output


def test_cli_names_the_extra_when_the_web_stack_is_missing(tiny_bundle, monkeypatch):
    from click.testing import CliRunner

    import abl_guard.guard.service as service
    from abl_guard.cli import main as cli

    monkeypatch.setattr(service, "missing_dependencies", lambda: ["uvicorn"])
    r = CliRunner().invoke(cli, ["serve", str(tiny_bundle)])
    assert r.exit_code == 1 and "pip install 'abl-guard[serve]'" in r.output and "uvicorn" in r.output

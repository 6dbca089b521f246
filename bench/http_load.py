"""HTTP serving benchmark: `abl-guard serve` under load vs the in-process `Guard` on the same inputs, and server memory.

1. Model and bundle like ``bench/serve.py``'s: a small CNN trained 2 epochs on 6,000 Fashion-MNIST images (the real
   CLI: ``train`` + ``export``), calibrated on 3,000 clean test images at 1% FPR with the default detector set;
   cached under ``--work`` (default ``/tmp/abl_guard_http``).
2. The server is ``abl-guard serve`` in a subprocess on 127.0.0.1 (ephemeral port, default settings, access log to a
   file). The load generator is a bounded asyncio client on raw keep-alive HTTP/1.1 streams: ``concurrency``
   connections each send single-image PNG requests back to back, until a fixed request count or a duration is
   reached, whichever comes first. Every response is checked: status 200, one verdict, and the label and flag equal
   to the in-process guard's on the same decoded image (decisions exactly); any failure is counted and reported.
3. In the same run, interleaved with the HTTP measurements in rounds: ``Guard.inspect`` in this process on the same
   decoded inputs at batch 1 and batch 64 (the server is idle meanwhile). Ratios are taken within a round and the
   median over rounds is reported, since the machine is shared and absolute numbers drift.
4. A long run (``--long`` requests at concurrency 64) samples the server's resident memory (``VmRSS``) twice a second.

The client shares the machine's cores with the server, so its own CPU time is part of what the service numbers pay.

Usage: python bench/http_load.py [--rounds 3] [--long 100000] [--work /tmp/abl_guard_http]
Writes bench/results/http.json and http.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from _common import cpu_name, write_markdown_keeping_notes

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def sh(cmd: list[str]) -> None:
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------------------ setup


def build_bundle(work: Path) -> Path:
    """Train + export + calibrate with the CLI, once (cached in ``work``)."""
    cli = str(BIN / "abl-guard")
    onnx_path, bundle = work / "model.onnx", work / "bundle"
    if not onnx_path.exists():
        sh([cli, "-q", "train", "--dataset", "fashion-mnist", "--attack", "none", "--epochs", "2", "--train-limit",
            "6000", "--test-limit", "2000", "--lr", "0.05", "--device", "cpu", "-o", str(work / "train")])
        sh([cli, "-q", "export", str(work / "train" / "model.pt"), "-o", str(onnx_path)])
    if not (bundle / "manifest.json").exists():
        sh([cli, "-q", "calibrate", str(onnx_path), "--dataset", "fashion-mnist", "--split", "test", "--count",
            "3000", "--fpr", "0.01", "-o", str(bundle), "--force"])
    return bundle


def make_inputs(n: int) -> tuple[dict[str, list[bytes]], np.ndarray]:
    """``n`` unseen Fashion-MNIST test images as request bodies (``.npy`` uint8 and PNG), and their decoded model
    inputs (what the server sees; identical for both, the PNGs being lossless)."""
    from PIL import Image

    from abl_guard.abl.data import load_dataset
    from abl_guard.guard.sources import decode_image

    imgs = load_dataset("fashion-mnist", "test").images[3000 : 3000 + n]
    bodies: dict[str, list[bytes]] = {"npy": [], "png": []}
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im[..., 0]).save(buf, format="PNG")
        bodies["png"].append(buf.getvalue())
        buf = io.BytesIO()
        np.save(buf, im, allow_pickle=False)
        bodies["npy"].append(buf.getvalue())
    x = np.stack([decode_image(p, (1, 28, 28))[0] for p in bodies["png"]])
    assert np.array_equal(x, np.ascontiguousarray(imgs.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255))
    return bodies, x


class ServerProcess:
    def __init__(self, bundle: Path, work: Path, args: list[str]) -> None:
        self.err = work / "serve.stderr"
        self.access = work / "access.jsonl"
        for f in (self.err, self.access):
            f.unlink(missing_ok=True)
        cmd = [str(BIN / "abl-guard"), "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
               "--access-log", str(self.access), *args]
        print(f"$ {shlex.join(cmd)}", flush=True)
        self._f = open(self.err, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._f)
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.err.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("server did not start: " + self.err.read_text(errors="replace")[-2000:])

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._f.close()
        return rc


# ------------------------------------------------------------------------------------------------ load generator


async def _worker(port: int, requests: list[bytes], expect: list[tuple[int, bool]], start: int, step: int,
                  budget: dict, lat: list[float], fails: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = start
    try:
        while budget["left"] > 0 and time.perf_counter() < budget["until"]:
            budget["left"] -= 1
            k = i % len(requests)
            i += step
            t0 = time.perf_counter()
            writer.write(requests[k])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            m = re.search(rb"(?i)content-length: *(\d+)", head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            lat.append(time.perf_counter() - t0)
            if status != 200:
                fails[f"status {status}"] = fails.get(f"status {status}", 0) + 1
                continue
            v = json.loads(body)["verdicts"]
            if len(v) != 1 or (v[0]["label"], v[0]["flagged"]) != expect[k]:
                fails["wrong answer"] = fails.get("wrong answer", 0) + 1
    except (OSError, asyncio.IncompleteReadError) as e:
        fails[type(e).__name__] = fails.get(type(e).__name__, 0) + 1
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], expect: list[tuple[int, bool]], concurrency: int, count: int,
                seconds: float) -> dict:
    budget = {"left": count, "until": time.perf_counter() + seconds}
    lat: list[float] = []
    fails: dict[str, int] = {}
    t0 = time.perf_counter()
    await asyncio.gather(*(_worker(port, requests, expect, w, concurrency, budget, lat, fails)
                           for w in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"concurrency": concurrency, "requests": len(lat), "seconds": wall, "throughput": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "failures": fails}


def run_load(port: int, requests: list[bytes], expect: list[tuple[int, bool]], concurrency: int, count: int,
             seconds: float) -> dict:
    try:
        import uvloop

        return uvloop.run(_load(port, requests, expect, concurrency, count, seconds))
    except ImportError:
        return asyncio.run(_load(port, requests, expect, concurrency, count, seconds))


CONTENT_TYPES = {"npy": b"application/x-npy", "png": b"image/png"}


def batch_counts(port: int) -> tuple[float, float]:
    """``(inputs, model calls)`` so far, from the server's ``abl_guard_batch_size`` histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return (float(re.search(r"^abl_guard_batch_size_sum (\S+)", text, re.M).group(1)),
            float(re.search(r"^abl_guard_batch_size_count (\S+)", text, re.M).group(1)))


def http_request(body: bytes, kind: str) -> bytes:
    return (b"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + CONTENT_TYPES[kind] + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


# ------------------------------------------------------------------------------------------------ in-process


def inprocess(guard, x: np.ndarray, batch: int, seconds: float) -> dict:
    """``Guard.inspect`` back to back on ``batch``-sized slices of ``x`` for about ``seconds``."""
    guard.inspect(x[:batch])  # warm-up
    times, n, i = [], 0, 0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        s = (i * batch) % (len(x) - batch + 1)
        t0 = time.perf_counter()
        guard.inspect(x[s : s + batch])
        times.append(time.perf_counter() - t0)
        n += batch
        i += 1
    ms = np.asarray(times) * 1e3
    return {"batch": batch, "inputs": n, "throughput": n / float(np.sum(times)),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


# ------------------------------------------------------------------------------------------------ report


def _med(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def write_results(res: dict, path_md: Path) -> None:
    rounds = res["rounds"]
    lines = [
        "# HTTP serving benchmark: `abl-guard serve` vs the in-process guard",
        "",
        f"CPU: {res['cpu']} ({res['cores']} cores visible, shared with other jobs; the load generator runs on the same "
        "cores as the server). Absolute numbers drift with the load of the machine, so every ratio is taken within "
        f"one round and the median over {len(rounds)} rounds is shown.",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Server: `abl-guard serve` with default settings ({res['server_settings']}), access log to a file; "
        f"{res['versions_line']}. Model: {res['model']}; bundle: mahalanobis (the default set), calibrated on 3,000 "
        "clean test images at 1% FPR.",
        "",
        "Requests: one 28×28 image per request to `POST /v1/inspect` (full verdict JSON back) as a uint8 `.npy` "
        "body (`npy`) or a PNG (`png`, decoded by Pillow in the server), over keep-alive connections, each "
        "connection sending its next request when the previous answer arrived (`cN` = N connections). In-process: "
        "`Guard.inspect` on the same images already decoded (float32), at batch 1 and batch 64.",
        "",
        "| | inputs/s (median) | × in-process batch 64 | × in-process batch 1 | p50 ms | p99 ms | mean batch | "
        "requests | failed or wrong |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in ("1", "64"):
        rows = [r["inprocess"][b] for r in rounds]
        lines.append(f"| in-process `Guard.inspect`, batch {b} | {_med(rows, 'throughput'):.0f} | "
                     f"{np.median([r['inprocess'][b]['throughput'] / r['inprocess']['64']['throughput'] for r in rounds]):.2f} | "  # noqa: E501
                     f"{np.median([r['inprocess'][b]['throughput'] / r['inprocess']['1']['throughput'] for r in rounds]):.2f} | "  # noqa: E501
                     f"{_med(rows, 'p50_ms'):.2f} | {_med(rows, 'p99_ms'):.2f} | {b} | "
                     f"{sum(r['inputs'] for r in rows)} (inputs) | – |")
    for c in res["series"]:
        rows = [r["http"][c] for r in rounds]
        fails = sum(sum(r["failures"].values()) for r in rows)
        lines.append(
            f"| HTTP {c} | {_med(rows, 'throughput'):.0f} | {res['ratio_b64'][c]:.2f} "
            f"({min(res['ratio_b64_rounds'][c]):.2f}–{max(res['ratio_b64_rounds'][c]):.2f}) | "
            f"{res['ratio_b1'][c]:.2f} | {_med(rows, 'p50_ms'):.2f} | {_med(rows, 'p99_ms'):.2f} | "
            f"{_med(rows, 'mean_batch'):.1f} | {sum(r['requests'] for r in rows)} | {fails} |")
    t = res["targets"]
    lines += [
        "",
        "Targets (`.npy` bodies): at concurrency 64, service throughput ≥ 0.6× the in-process guard at batch 64 — "
        f"measured "
        f"{t['c64_ratio']:.2f}× ({'met' if t['c64_ratio'] >= 0.6 else 'NOT met'}); p99 at concurrency 1 under 10 ms "
        f"— measured {t['c1_p99_ms']:.2f} ms ({'met' if t['c1_p99_ms'] < 10 else 'NOT met'}). Failed or wrong "
        f"responses over the whole run: {t['failures']}. Mean batch = inputs per model call during that "
        "measurement (the server's `abl_guard_batch_size` histogram).",
        "",
    ]
    lg = res["long_run"]
    if lg:
        lines += [
            f"## Memory over a long run ({lg['requests']:,} requests at concurrency {lg['concurrency']})",
            "",
            f"{lg['throughput']:.0f} requests/s over {lg['seconds']:.0f} s, p50 {lg['p50_ms']:.2f} ms, p99 "
            f"{lg['p99_ms']:.2f} ms, {sum(lg['failures'].values())} failed or wrong. Server resident memory "
            f"(VmRSS, sampled every 0.5 s, {len(lg['rss_mib'])} samples): {lg['rss_start_mib']:.1f} MiB after "
            f"warm-up, median {lg['rss_median_mib']:.1f}, max {lg['rss_max_mib']:.1f}, {lg['rss_end_mib']:.1f} at "
            f"the end; mean of the last quarter vs the first quarter: {lg['rss_growth']:.3f}× — "
            f"{'flat' if lg['rss_growth'] < 1.05 else 'NOT flat'}.",
            "",
        ]
    lines += [f"Server exit status after SIGTERM: {res['server_exit']}.", ""]
    write_markdown_keeping_notes(path_md, "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/abl_guard_http", help="Cache for the model, bundle and server logs.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8,64", help="Concurrency levels with .npy bodies.")
    ap.add_argument("--png", default="1,64", help="Concurrency levels with PNG bodies.")
    ap.add_argument("--requests", type=int, default=20000, help="Most requests per HTTP measurement.")
    ap.add_argument("--seconds", type=float, default=6.0, help="Longest HTTP measurement.")
    ap.add_argument("--inprocess-seconds", type=float, default=3.0)
    ap.add_argument("--long", type=int, default=100000, help="Requests of the memory run (0: skip).")
    ap.add_argument("--long-seconds", type=float, default=240.0, help="Longest memory run.")
    ap.add_argument("--server-arg", action="append", default=[], help="Extra `abl-guard serve` option (repeatable).")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()

    import numpy
    import onnxruntime

    from abl_guard.guard import Guard

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(work)
    bodies, x = make_inputs(512)
    guard = Guard.load(bundle)
    ref = guard.inspect(x)
    expect = [(v.label, v.flagged) for v in ref]
    requests = {k: [http_request(b, k) for b in v] for k, v in bodies.items()}
    conc = [int(c) for c in args.concurrency.split(",")]
    series = [f"npy c{c}" for c in conc] + [f"png c{c}" for c in (int(c) for c in args.png.split(",") if c)]

    server = ServerProcess(bundle, work, args.server_arg)
    rounds = []
    try:
        for kind in requests:
            run_load(server.port, requests[kind], expect, 8, 300, 5.0)  # warm-up
        for r in range(args.rounds):
            rnd: dict = {"inprocess": {}, "http": {}}
            for b in (1, 64):
                rnd["inprocess"][str(b)] = inprocess(guard, x, b, args.inprocess_seconds)
            for name in series:
                kind, c = name.split(" c")
                before = batch_counts(server.port)
                rnd["http"][name] = run_load(server.port, requests[kind], expect, int(c), args.requests,
                                             args.seconds)
                after = batch_counts(server.port)
                rnd["http"][name]["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            rounds.append(rnd)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"b{b} {rnd['inprocess'][b]['throughput']:.0f}/s" for b in rnd["inprocess"]) + "; " + ", ".join(
                f"c{c} {v['throughput']:.0f}/s p99 {v['p99_ms']:.1f} ms fails {v['failures']}"
                for c, v in rnd["http"].items()), flush=True)

        long_run = None
        if args.long:
            samples: list[float] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.5):
                    samples.append(server.rss_mib())

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            long_run = run_load(server.port, requests["npy"], expect, 64, args.long, args.long_seconds)
            stop.set()
            th.join()
            q = max(1, len(samples) // 4)
            long_run.update(rss_mib=samples, rss_start_mib=samples[0], rss_end_mib=samples[-1],
                            rss_max_mib=max(samples), rss_median_mib=float(np.median(samples)),
                            rss_growth=float(np.mean(samples[-q:]) / np.mean(samples[:q])))
            print(f"long run: {long_run['requests']} requests, {long_run['throughput']:.0f}/s, RSS "
                  f"{long_run['rss_start_mib']:.1f} -> {long_run['rss_end_mib']:.1f} MiB", flush=True)
    finally:
        exit_code = server.stop()

    ratio_b64 = {n: [r["http"][n]["throughput"] / r["inprocess"]["64"]["throughput"] for r in rounds] for n in series}
    ratio_b1 = {n: [r["http"][n]["throughput"] / r["inprocess"]["1"]["throughput"] for r in rounds] for n in series}
    meta = json.loads((work / "train" / "run.json").read_text()) if (work / "train" / "run.json").exists() else {}
    ca = meta.get("metrics", {}).get("clean_accuracy")
    import starlette
    import uvicorn

    failures = sum(sum(r["http"][c]["failures"].values()) for r in rounds for c in r["http"])
    failures += sum(long_run["failures"].values()) if long_run else 0
    res = {
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "command": "python bench/http_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                     "python": platform.python_version(), "uvicorn": uvicorn.__version__,
                     "starlette": starlette.__version__},
        "versions_line": f"uvicorn {uvicorn.__version__}, starlette {starlette.__version__}, onnxruntime "
                         f"{onnxruntime.__version__}, Python {platform.python_version()}",
        "server_settings": "max batch 64, max wait 2 ms, onnxruntime threads = cores" + (
            f", {' '.join(args.server_arg)}" if args.server_arg else ""),
        "model": "small-cnn, Fashion-MNIST, 2 epochs on 6,000 training images"
                 + (f" (clean accuracy {ca:.1%} on 2,000 test images)" if ca is not None else ""),
        "series": series, "rounds": rounds,
        "ratio_b64_rounds": ratio_b64, "ratio_b1_rounds": ratio_b1,
        "ratio_b64": {c: float(np.median(v)) for c, v in ratio_b64.items()},
        "ratio_b1": {c: float(np.median(v)) for c, v in ratio_b1.items()},
        "long_run": long_run, "server_exit": exit_code,
        "targets": {"c64_ratio": float(np.median(ratio_b64["npy c64"])) if "npy c64" in ratio_b64 else float("nan"),
                    "c1_p99_ms": float(np.median([r["http"]["npy c1"]["p99_ms"] for r in rounds]))
                    if "npy c1" in series else float("nan"),
                    "failures": failures},
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "http.json").write_text(json.dumps(res, indent=1))
    write_results(res, results / "http.md")
    print((results / "http.md").read_text())
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

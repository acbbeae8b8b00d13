"""Load test of `hybridtune serve` on loopback: N requests at concurrency C against /v1/classify.

    python benchmarks/load_serve.py MODEL [--requests 500] [--concurrency 16] [--texts 1]
                                    [--max-batch 32] [--max-wait-ms 5] [--unbatched]
    python benchmarks/load_serve.py MODEL --bounds [--max-pending 16] [--rounds 5] [--requests 200]

MODEL is a run dir, an export dir or a model dir (docs/serve.md uses a MiniLM run trained on the
bundled Rotten Tomatoes). The server runs as its own process (`python -m hybridtune serve`, bearer
token auth on, as in production); this script waits for /health, sends 16 warm-up requests, then
the measured ones: closed loop, C requests in flight, each with `--texts` review sentences of the
bundled Rotten Tomatoes data. It prints p50 / p99 latency, throughput and the error count (any
response other than 200 with one prediction per text, or a failed connection), and from the
server's /metrics the forward calls and the mean batch size of the measured phase. `--unbatched`
runs a second server with --max-batch 1 (one forward per request) on the same requests.

`--bounds` checks the server's bounds instead (docs/serve.md), with a fixed number of requests and a
time limit for each phase: (1) concurrency = --max-pending: every answer is 200; (2) concurrency
4 x --max-pending: every answer is 200 or 503 with Retry-After (no timeout, no connection error, no
other status); (3) --rounds of phase 2: the server's RSS after each round (flat = no growth beyond
noise); (4) SIGTERM with a burst in flight: the requests the server took are answered 200, the
server exits (by the signal) with no traceback on its stderr. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def review_texts() -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from hybridtune.bundled import dataset

    frame, _ = dataset("bundled:rotten_tomatoes")
    return frame["text"].tolist()


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


class Server:
    """`hybridtune serve` in a child process, stopped on exit."""

    def __init__(self, model: str, max_batch: int, max_wait_ms: float, extra: tuple[str, ...] = ()):
        self.token, self.port = secrets.token_hex(16), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HYBRIDTUNE_TOKEN": self.token,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT / "src"),
        }
        cmd = [sys.executable, "-m", "hybridtune", "serve", model, "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), *extra]
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start in 600 s")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return round(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024, 1)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


async def burst(server: Server, texts: list[str], n: int, concurrency: int, limit_s: float) -> dict:
    """`n` requests, `concurrency` in flight; the statuses counted ("error" = no HTTP answer)."""
    headers = {"Authorization": f"Bearer {server.token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    counts: dict[str, int] = {}
    retry_after_missing = 0
    async with httpx.AsyncClient(
        base_url=server.url, headers=headers, timeout=limit_s, limits=limits
    ) as client:

        async def one(i: int) -> None:
            nonlocal retry_after_missing
            try:
                r = await client.post("/v1/classify", json={"texts": [texts[i % len(texts)]]})
                key = str(r.status_code)
                retry_after_missing += r.status_code == 503 and "retry-after" not in r.headers
            except httpx.TimeoutException:
                key = "timeout"
            except httpx.HTTPError:
                key = "error"
            counts[key] = counts.get(key, 0) + 1

        gate = asyncio.Semaphore(concurrency)

        async def gated(i: int) -> None:
            async with gate:
                await one(i)

        await asyncio.wait_for(asyncio.gather(*(gated(i) for i in range(n))), limit_s)
    return {"statuses": counts, "503_without_retry_after": retry_after_missing}


async def sigterm(server: Server, texts: list[str], n: int) -> dict:
    headers = {"Authorization": f"Bearer {server.token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
        tasks = [
            asyncio.create_task(client.post("/v1/classify", json={"texts": [texts[i % len(texts)]]}))
            for i in range(n)
        ]
        await asyncio.sleep(0.2)  # connected and queued
        server.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    code = await asyncio.to_thread(server.proc.wait, 60)
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r.status_code) if isinstance(r, httpx.Response) else "not taken (connection refused)"
        statuses[key] = statuses.get(key, 0) + 1
    return {"statuses": statuses, "exit_status": code, "traceback": "Traceback" in server.stderr()}


def bounds(args, texts: list[str]) -> dict:
    p = args.max_pending
    extra = ("--max-pending", str(p), "--timeout", str(args.timeout))
    out: dict = {"max_pending": p, "timeout_s": args.timeout}
    with Server(args.model, args.max_batch, args.max_wait_ms, extra) as server:
        out["below"] = asyncio.run(burst(server, texts, args.requests, p, args.phase_s))
        out["above"] = asyncio.run(burst(server, texts, args.requests, 4 * p, args.phase_s))
        out["rss_mib"] = [server.rss_mib()]
        for _ in range(args.rounds):
            asyncio.run(burst(server, texts, args.requests, 4 * p, args.phase_s))
            out["rss_mib"].append(server.rss_mib())
    with Server(args.model, args.max_batch, args.max_wait_ms, extra) as server:
        # as many as the server admits (--max-pending): each one in flight must be answered 200; a
        # burst above the bound would add 503s at admission, which phase 2 checks already
        out["sigterm"] = asyncio.run(sigterm(server, texts, p))
    below, above = out["below"]["statuses"], out["above"]["statuses"]
    out["checks"] = {
        "0 errors below the bound": set(below) == {"200"},
        "only 200 / 503 above it": set(above) <= {"200", "503"}
        and not out["above"]["503_without_retry_after"],
        "RSS growth after round 1 (MiB)": round(out["rss_mib"][-1] - out["rss_mib"][min(1, args.rounds)], 1),
        "SIGTERM: in-flight answered, no traceback": set(out["sigterm"]["statuses"])
        <= {"200", "not taken (connection refused)"}
        and not out["sigterm"]["traceback"],
    }
    return out


async def load(server: Server, texts: list[str], requests: int, concurrency: int, per: int) -> dict:
    headers = {"Authorization": f"Bearer {server.token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300, limits=limits) as client:
        latencies: list[float] = []
        errors = 0
        next_request = 0

        async def one(i: int) -> bool:
            body = {"texts": [texts[(i * per + j) % len(texts)] for j in range(per)]}
            try:
                response = await client.post("/v1/classify", json=body)
                return response.status_code == 200 and len(response.json()["predictions"]) == per
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        async def worker(measure: bool, total: int) -> None:
            nonlocal next_request, errors
            while next_request < total:
                i, next_request = next_request, next_request + 1
                started = time.perf_counter()
                ok = await one(i)
                if measure:
                    latencies.append(time.perf_counter() - started)
                    errors += not ok

        await asyncio.gather(*(worker(False, 16) for _ in range(min(concurrency, 16))))  # warm-up
        before = (await client.get("/metrics")).text
        next_request = 0
        started = time.perf_counter()
        await asyncio.gather(*(worker(True, requests) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = (await client.get("/metrics")).text
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    calls = metric(after, "hybridtune_forward_calls_total") - metric(before, "hybridtune_forward_calls_total")
    items = metric(after, "hybridtune_batch_size_sum") - metric(before, "hybridtune_batch_size_sum")
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(1000 * quantiles[49], 1),
        "p99_ms": round(1000 * quantiles[98], 1),
        "requests_per_s": round(len(latencies) / wall, 1),
        "texts_per_s": round(len(latencies) * per / wall, 1),
        "forward_calls": int(calls),
        "mean_batch": round(items / calls, 2) if calls else None,
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a run dir, an export dir or a model dir")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--texts", type=int, default=1, help="texts per request")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--unbatched", action="store_true", help="also run with --max-batch 1")
    parser.add_argument("--bounds", action="store_true", help="check the bounds instead (see above)")
    parser.add_argument("--max-pending", type=int, default=16, help="--bounds: the server's bound")
    parser.add_argument("--timeout", type=float, default=30.0, help="--bounds: the server's --timeout")
    parser.add_argument("--rounds", type=int, default=5, help="--bounds: rounds for the RSS check")
    parser.add_argument("--phase-s", type=float, default=300.0, help="--bounds: time limit of a phase")
    args = parser.parse_args()
    texts = review_texts()
    if args.bounds:
        print(f"bounds of {args.model}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        result = bounds(args, texts)
        for name, value in result["checks"].items():
            print(f"{name:>45}: {value}")
        print(json.dumps(result))
        return
    setups = [("dynamic batching", args.max_batch, args.max_wait_ms)]
    if args.unbatched:
        setups.append(("one forward per request", max(1, args.texts), 0.0))
    print(f"{args.requests} requests x {args.texts} text(s), concurrency {args.concurrency}, {args.model}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    results = {}
    for name, max_batch, max_wait in setups:
        with Server(args.model, max_batch, max_wait) as server:
            result = asyncio.run(load(server, texts, args.requests, args.concurrency, args.texts))
        results[name] = {"max_batch": max_batch, "max_wait_ms": max_wait, **result}
        print(
            f"{name:>24}: p50 {result['p50_ms']:.1f} ms · p99 {result['p99_ms']:.1f} ms · "
            f"{result['requests_per_s']:.1f} req/s · errors {result['errors']} · "
            f"{result['forward_calls']} forwards (mean batch {result['mean_batch']})"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

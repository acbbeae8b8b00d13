"""Load test of `hybridtune serve` on loopback: N requests at concurrency C against /v1/classify.

    python benchmarks/load_serve.py MODEL [--requests 500] [--concurrency 16] [--texts 1]
                                    [--max-batch 32] [--max-wait-ms 5] [--unbatched]

MODEL is a run dir, an export dir or a model dir (docs/serve.md uses a MiniLM run trained on the
bundled Rotten Tomatoes). The server runs as its own process (`python -m hybridtune serve`, bearer
token auth on, as in production); this script waits for /health, sends 16 warm-up requests, then
the measured ones: closed loop, C requests in flight, each with `--texts` review sentences of the
bundled Rotten Tomatoes data. It prints p50 / p99 latency, throughput and the error count (any
response other than 200 with one prediction per text, or a failed connection), and from the
server's /metrics the forward calls and the mean batch size of the measured phase. `--unbatched`
runs a second server with --max-batch 1 (one forward per request) on the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
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

    def __init__(self, model: str, max_batch: int, max_wait_ms: float):
        self.token, self.port = secrets.token_hex(16), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HYBRIDTUNE_TOKEN": self.token,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT / "src"),
        }
        cmd = [sys.executable, "-m", "hybridtune", "serve", model, "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
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
        self.proc.terminate()
        self.proc.wait(30)


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
    args = parser.parse_args()
    texts = review_texts()
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

"""Load on ``gradcam serve`` over loopback: requests/s and p50/p99 latency at 1 and 16 clients.

Starts the real server (``gradcam serve``, the bundled EfficientNet-Lite0, uvicorn) as a subprocess on a
free loopback port, waits for /healthz, then runs closed-loop clients (each sends its next request when
the previous answer arrives) posting the sample cat to /v1/explain (Grad-CAM, top-1), bounded by a
request count and a time limit, whichever comes first. Each level runs against a server with
micro-batching (``--max-batch 16``) and, as the baseline measured in the same run, one without it
(``--max-batch 1``); the ratio of their requests/s shows what batching buys at that concurrency.

Run: ``.venv/bin/python benchmarks/serve_load.py [--requests 64] [--seconds 60] [--clients 1,16]``.
A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

CAT = Path(__file__).resolve().parents[1] / "examples" / "cat.png"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(max_batch: int, scratch: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    database = f"sqlite:///{scratch / f'gradcam-load-{max_batch}.db'}"
    command = [
        sys.executable, "-m", "gradcam", "serve", "--port", str(port), "--max-batch", str(max_batch),
        "--db", database, "--admin-token", "benchmark-token-0123456789",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start within 120 s")


async def load(url: str, clients: int, requests: int, seconds: float) -> tuple[list[float], float]:
    image = CAT.read_bytes()
    latencies: list[float] = []
    sent = 0
    stop_at = time.perf_counter() + seconds

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < stop_at:
            sent += 1
            started = time.perf_counter()
            response = await session.post(f"{url}/v1/explain", files={"image": ("cat.png", image)})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as session:
        await session.post(f"{url}/v1/explain", files={"image": ("cat.png", image)})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - started
    return latencies, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="Requests per level (at most).")
    parser.add_argument("--seconds", type=float, default=60, help="Time limit per level.")
    parser.add_argument("--clients", default="1,16", help="Concurrency levels, comma-separated.")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    results: dict[tuple[int, int], tuple[float, float, float, int]] = {}
    for max_batch in (16, 1):
        server, url = start_server(max_batch, scratch)
        try:
            for clients in levels:
                latencies, wall = asyncio.run(load(url, clients, args.requests, args.seconds))
                results[(max_batch, clients)] = (
                    len(latencies) / wall,
                    statistics.median(latencies),
                    percentile(latencies, 99),
                    len(latencies),
                )
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    print(f"POST /v1/explain, efficientnet-lite0, Grad-CAM top-1, {CAT.name}; {os.cpu_count()} CPUs")
    print(f"{'max-batch':>9} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for (max_batch, clients), (rate, p50, p99, count) in results.items():
        print(f"{max_batch:>9} {clients:>7} {count:>8} {rate:>7.2f} {p50 * 1000:>8.0f} {p99 * 1000:>8.0f}")
    for clients in levels:
        ratio = results[(16, clients)][0] / results[(1, clients)][0]
        print(f"{clients} clients: batching / no batching = {ratio:.2f}x requests/s")


if __name__ == "__main__":
    main()

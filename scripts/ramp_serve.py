"""Autoscaling, measured: a load ramp that drives the endpoint from its minimum to its maximum
engine replicas and back, on a local Ray head, over loopback.

Phases: `--low` callers until the replicas are at the minimum, `--high` callers until they
reach the maximum (and `--hold` seconds more), then `--low` again until they are back at the
minimum. Every second it reads the engine deployment's status from Ray Serve (replicas
running / starting, UPSCALING or DOWNSCALING); every request's status and latency are kept.
Prints a table per `--interval` seconds and the scaling times, and writes a PNG (replicas,
callers and latency over time) and a JSON report.

Logical CPUs: each engine replica reserves 2 (its actor and its placement bundle), so a second
replica needs `--num-cpus 4` even on a 2-core machine; it then shares the same two cores.

    python scripts/ramp_serve.py [--config configs/serve/demo.yaml] [--out docs/scaling-ramp.png]
    python scripts/ramp_serve.py --min-replicas 0   # scale from zero: the first request waits
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import threading
import time

import httpx
from serve_harness import REPO, percentile, start_endpoint

KEY = "sk-ramp-" + os.urandom(6).hex()


class Ramp:
    """Callers whose number can change while they run, and what they saw."""

    def __init__(self, url: str, body: dict, max_callers: int):
        self.url, self.body, self.max_callers = url, body, max_callers
        self.callers = 0
        self.requests: list[tuple[float, float, int | None]] = []  # (start, latency, status)
        self.samples: list[dict] = []
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def caller(self, index: int, client: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        while not self.stopped.is_set():
            if index >= self.callers:
                await asyncio.sleep(0.2)
                continue
            started = self.now()
            try:
                response = await client.post(
                    f"{self.url}/chat/completions", json=self.body, headers=headers
                )
                status = response.status_code
            except httpx.HTTPError:
                status = None
            self.requests.append((started, self.now() - started, status))
            if status != 200:
                await asyncio.sleep(0.5)

    def run_callers(self) -> None:
        async def all_callers():
            async with httpx.AsyncClient(timeout=300) as client:
                await asyncio.gather(*(self.caller(i, client) for i in range(self.max_callers)))

        asyncio.run(all_callers())

    def sample(self, app: str, deployment: str) -> dict:
        from ray import serve

        status = serve.status().applications[app].deployments[deployment]
        states = {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}
        row = {
            "t": round(self.now(), 1),
            "callers": self.callers,
            "running": states.get("RUNNING", 0),
            "starting": states.get("STARTING", 0),
            "status": str(getattr(status.status, "value", status.status)),
        }
        keys = ("callers", "running", "starting", "status")
        if not self.samples or any(self.samples[-1][k] != row[k] for k in keys):
            print(
                f"[ramp] {row['t']:6.1f} s: {row['callers']} callers, engine replicas "
                f"{row['running']} running / {row['starting']} starting, {row['status']}",
                flush=True,
            )
        self.samples.append(row)
        return row


def engine_deployment(app: str) -> str:
    from ray import serve

    names = serve.status().applications[app].deployments
    return next(name for name in names if name.startswith("EngineServer"))


def drive(ramp: Ramp, app: str, args) -> dict:
    deployment = engine_deployment(app)
    events: dict[str, float] = {}

    def until(predicate, timeout: float, hold: float = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = ramp.sample(app, deployment)
            if row["status"] == "UPSCALING":
                events.setdefault("upscale_decision", row["t"])
            if row["status"] == "DOWNSCALING":
                events.setdefault("downscale_decision", row["t"])
            if predicate(row):
                break
            time.sleep(1)
        end = time.monotonic() + hold
        while time.monotonic() < end:
            ramp.sample(app, deployment)
            time.sleep(1)

    ramp.callers = args.low
    until(lambda r: False, args.warmup)
    ramp.callers = args.high
    events["load_up"] = ramp.now()
    until(lambda r: r["running"] >= args.max_replicas, args.timeout, hold=args.hold)
    events["at_max"] = next(
        (s["t"] for s in ramp.samples if s["running"] >= args.max_replicas), None
    )
    ramp.callers = args.low
    events["load_down"] = ramp.now()
    until(
        lambda r: r["running"] <= max(args.min_replicas, 1) and r["status"] == "HEALTHY",
        args.timeout,
        hold=10,
    )
    events["back_at_min"] = next(
        (
            s["t"]
            for s in ramp.samples
            if s["t"] > events["load_down"] and s["running"] <= max(args.min_replicas, 1)
        ),
        None,
    )
    return events


def intervals(ramp: Ramp, seconds: float) -> list[dict]:
    rows = []
    end = max((s for s, _, _ in ramp.requests), default=0)
    start = 0.0
    while start <= end:
        window = [(lat, st) for s, lat, st in ramp.requests if start <= s < start + seconds]
        admitted = [lat for lat, st in window if st == 200]
        replicas = [x["running"] for x in ramp.samples if start <= x["t"] < start + seconds]
        callers = [x["callers"] for x in ramp.samples if start <= x["t"] < start + seconds]
        rows.append(
            {
                "from_s": start,
                "callers": max(callers, default=0),
                "replicas": max(replicas, default=0),
                "requests": len(window),
                "errors": len(window) - len(admitted),
                "p50_s": percentile(admitted, 50),
                "p99_s": percentile(admitted, 99),
            }
        )
        start += seconds
    return rows


def plot(ramp: Ramp, events: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    t = [s["t"] for s in ramp.samples]
    top.step(t, [s["running"] for s in ramp.samples], where="post", label="engine replicas running")
    top.step(
        t,
        [s["running"] + s["starting"] for s in ramp.samples],
        where="post",
        linestyle="--",
        label="running + starting",
    )
    top.set_ylabel("replicas")
    twin = top.twinx()
    twin.plot(t, [s["callers"] for s in ramp.samples], color="grey", alpha=0.5, label="callers")
    twin.set_ylabel("callers")
    top.legend(loc="upper left")
    ok = [(s, lat) for s, lat, st in ramp.requests if st == 200]
    bottom.scatter([s for s, _ in ok], [lat for _, lat in ok], s=4, label="answered (200)")
    bad = [s for s, _, st in ramp.requests if st != 200]
    if bad:
        bottom.scatter(bad, [0] * len(bad), s=12, marker="x", color="red", label="refused/failed")
    for name, moment in events.items():
        if moment is not None:
            bottom.axvline(moment, color="black", alpha=0.3)
            bottom.text(moment, bottom.get_ylim()[1] * 0.9, name, rotation=90, fontsize=7)
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/serve/demo.yaml")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the Ray head")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--low", type=int, default=1, help="callers at rest")
    parser.add_argument("--high", type=int, default=12, help="callers at peak")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=30)
    parser.add_argument("--hold", type=float, default=60, help="seconds at peak after max")
    parser.add_argument("--timeout", type=float, default=420, help="longest wait per phase")
    parser.add_argument("--downscale-delay", type=float, default=30)
    parser.add_argument("--interval", type=float, default=15)
    parser.add_argument("--out", default="docs/scaling-ramp.png")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    overrides = {
        "http_port": args.port,
        "max_queued_requests": 4 * args.high,
        "autoscaling": {
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "downscale_delay_s": args.downscale_delay,
        },
    }
    started = time.monotonic()
    url, cfg, stop = start_endpoint(
        str(REPO / args.config), KEY, num_cpus=args.num_cpus, overrides=overrides, quiet=True
    )
    report: dict = {"endpoint_ready_s": round(time.monotonic() - started, 1)}
    body = {
        "model": cfg.model_id,
        "messages": [{"role": "user", "content": "My order arrived damaged. What should I do?"}],
        "max_tokens": args.tokens,
        "temperature": 0,
    }
    ramp = Ramp(url, body, args.high)
    if args.min_replicas == 0:  # scale from zero: idle until no engine replica runs, then ask
        deployment = engine_deployment(cfg.name)
        deadline = time.monotonic() + args.timeout
        while ramp.sample(cfg.name, deployment)["running"] and time.monotonic() < deadline:
            time.sleep(1)
        first = time.monotonic()
        answer = httpx.post(
            f"{url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=600,
        )
        report["from_zero_first_request_s"] = round(time.monotonic() - first, 1)
        report["from_zero_status"] = answer.status_code
    callers = threading.Thread(target=ramp.run_callers, daemon=True)
    callers.start()
    try:
        events = drive(ramp, cfg.name, args)
    finally:
        ramp.stopped.set()
        callers.join(timeout=120)
        stop()
    rows = intervals(ramp, args.interval)
    report.update(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        config=args.config,
        args=vars(args),
        events=events,
        intervals=rows,
        samples=ramp.samples,
    )
    up = events.get("upscale_decision")
    report["decision_to_running_s"] = (
        round(events["at_max"] - up, 1) if up is not None and events.get("at_max") else None
    )
    report["load_down_to_min_s"] = (
        round(events["back_at_min"] - events["load_down"], 1) if events.get("back_at_min") else None
    )
    plot(ramp, events, args.out)
    out = REPO / ".fedforge" / "bench" / f"ramp-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\n| from s | callers | engine replicas | requests | errors | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p50 = "-" if r["p50_s"] is None else f"{r['p50_s'] * 1000:.0f}"
        p99 = "-" if r["p99_s"] is None else f"{r['p99_s'] * 1000:.0f}"
        print(
            f"| {r['from_s']:.0f} | {r['callers']} | {r['replicas']} | {r['requests']} | "
            f"{r['errors']} | {p50} | {p99} |"
        )
    keys = (
        "endpoint_ready_s",
        "from_zero_first_request_s",
        "decision_to_running_s",
        "load_down_to_min_s",
    )
    print("\n" + ", ".join(f"{k}: {report.get(k)}" for k in keys))
    print(f"events (s since the ramp began): {events}\nplot: {args.out}; report: {out}")
    reached = events.get("at_max") is not None and events.get("back_at_min") is not None
    return 0 if reached else 1


if __name__ == "__main__":
    raise SystemExit(main())

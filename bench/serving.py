"""Serving benchmark: our server against the floor and the Pathmind design, measured with ``wrk``.

    python bench/serving.py [--duration 10] [--quick] [--repeat 1] [--json OUT]

Starts, one at a time, each in its own ``uvicorn`` process (one worker) on its own port:

* ``ours``: ``uvicorn app:app`` on ``examples/cartpole/schema.yaml``, default Ray Serve backend;
* ``floor``: a plain FastAPI app with the model in its process and a sync endpoint
  (``bench/baselines/plain_fastapi.py``);
* ``pathmind``: a FastAPI gateway making one DeploymentHandle call, one forward pass, per request
  (``bench/baselines/pathmind.py``).

Each is warmed up, then loaded with ``wrk -t1 -c<clients>``: ``/predict`` with one observation at
1, 16 and 64 clients; on ours also ``/predict/batch`` with 1, 64 and 256 observations at 1 and 16
clients. Prints markdown tables and PASS/FAIL for each target, and writes the results as JSON to
``bench/results/serving.json`` (and to ``--json OUT``). Exit status 1 when a request failed,
0 otherwise (a failed target is a result, not an error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/serving.py` as well as `python -m bench.serving`
    sys.path.insert(0, str(ROOT))

from bench.cpu import CpuShare, cpu_share, wait_for_quiet  # noqa: E402
from bench.loadgen import WrkResult, find_wrk, run_wrk  # noqa: E402
from bench.servers import RunningServer, ServerSpec, running_server  # noqa: E402
from policy_server.net import free_port

EXAMPLE_SCHEMA = ROOT / "examples" / "cartpole" / "schema.yaml"
RESULTS_DIR = ROOT / "bench" / "results"
DESIGNS = {
    "ours": "ours: gateway micro-batching → Serve",
    "floor": "floor: plain FastAPI, in-process, sync",
    "pathmind": "Pathmind: one Serve handle call per request",
    "ours-handle": "ours, every batch through the Serve handle",
    "ours-local": "ours, local backend: the gateway alone, no Ray",
}
# On request only: ours-handle (no direct transport) and ours-local (no Ray) tell where time goes.
DEFAULT_DESIGNS = ("ours", "floor", "pathmind")
SINGLE_CLIENTS = (1, 16, 64)
BATCH_CLIENTS = (1, 16)
BATCH_SIZES = (1, 64, 256)
WARMUP_CLIENTS = 16
QUIET_CORES = 0.3  # other processes using less than this count as a quiet machine

Metric = Literal["requests_per_s", "observations_per_s", "p50_ms", "p99_ms"]


# --- what is sent, and what is measured ----------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the clients send: the endpoints' prefix, the api key and example observations."""

    prefix: str
    headers: dict[str, str]
    observations: list[dict[str, Any]]  # as many as the largest batch


@dataclass(frozen=True, eq=False)  # hashed by identity: the body is a dict
class Endpoint:
    path: str
    batch: int | None  # None: the single-observation endpoint
    body: Any
    clients: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.batch} obs" if self.batch else "single"


def endpoints(design: str, workload: Workload) -> list[Endpoint]:
    """What to load on one design: ``/predict`` everywhere, the batch forms on ours."""
    ours = design.startswith("ours")
    prefix = workload.prefix if ours else ""
    todo = [Endpoint(f"{prefix}/predict", None, workload.observations[0], SINGLE_CLIENTS)]
    if ours:
        todo += [
            Endpoint(f"{prefix}/predict/batch", n, {"observations": workload.observations[:n]}, BATCH_CLIENTS)
            for n in BATCH_SIZES
        ]
    return todo


@dataclass(frozen=True)
class Run:
    wrk: WrkResult
    cpu: CpuShare


@dataclass(frozen=True)
class Point:
    """One measured configuration; ``runs`` holds every repeat, the summary is their median."""

    design: str
    path: str
    batch: int | None
    clients: int
    runs: tuple[Run, ...]

    def value(self, metric: Metric) -> float:
        if metric == "observations_per_s":
            return self.value("requests_per_s") * (self.batch or 1)
        return statistics.median(getattr(r.wrk, metric) for r in self.runs)

    def cores(self, who: Literal["server", "client", "other"]) -> float:
        return statistics.median(getattr(r.cpu, who) for r in self.runs)

    @property
    def failed(self) -> int:
        return sum(r.wrk.failed for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        metrics: tuple[Metric, ...] = ("requests_per_s", "observations_per_s", "p50_ms", "p99_ms")
        return {
            "design": self.design, "path": self.path, "batch": self.batch, "clients": self.clients,
            **{m: round(self.value(m), 3) for m in metrics},
            "failed": self.failed,
            "cores": {who: round(self.cores(who), 3) for who in ("server", "client", "other")},
            "runs": [r.wrk.as_dict() | {"cores": r.cpu.as_dict()} for r in self.runs],
        }


@dataclass
class Results:
    points: list[Point] = field(default_factory=list)

    def get(self, design: str, clients: int, batch: int | None = None) -> Point | None:
        for p in self.points:
            if (p.design, p.clients, p.batch) == (design, clients, batch):
                return p
        return None


# --- the schema and the servers ------------------------------------------------------------------


def find_schema(tmp: Path) -> tuple[Path, bool]:
    """The cartpole example's schema, or (when it is missing) an equivalent written to ``tmp``."""
    if EXAMPLE_SCHEMA.is_file():
        return EXAMPLE_SCHEMA, False
    from policy_server.export import MLPPolicy, export_module, write_schema

    # TorchScript, as the example's model is
    model = export_module(MLPPolicy(4, [64, 64], nvec=[2]), 4, tmp / "models" / "policy.pt", "torchscript")
    fields = ("cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity")
    path = write_schema(
        tmp / "schema.yaml",
        {name: {"type": "float"} for name in fields},
        {"type": "discrete", "n": 2, "names": ["left", "right"]},
        model.relative_to(tmp).as_posix(),
        api_key="bench-key",
    )
    return path, True


def make_workload(schema_path: Path, n: int, seed: int = 0) -> Workload:
    """``n`` random observations that the schema's default policy accepts."""
    from policy_server.policies.served import resolve_policy
    from policy_server.schema.config import load_schema
    from policy_server.schema.observations import resolve_widths

    schema = load_schema(schema_path)
    spec = schema.policies[schema.default_policy]
    if not spec.observations:
        raise SystemExit(f"{schema_path}: the benchmark needs a policy with named `observations`")
    served, _ = resolve_policy(spec)
    widths = resolve_widths(spec.observations, served.obs_dim)
    rng = random.Random(seed)
    draw: dict[str, Callable[[], Any]] = {
        "int": lambda: rng.randint(-3, 3),
        "float": lambda: round(rng.uniform(-1.0, 1.0), 4),
        "bool": lambda: rng.random() < 0.5,
    }

    def value(kind: str, width: int) -> Any:
        if kind.startswith("List["):
            return [draw[kind[5:-1]]() for _ in range(width)]
        return draw[kind]()

    observations = [
        {name: value(f.type, widths[name]) for name, f in spec.observations.items()} for _ in range(n)
    ]
    headers = {"access-token": schema.api_key.get_secret_value()} if schema.api_key else {}
    return Workload(f"/{schema.url_path}" if schema.url_path else "", headers, observations)


def server_specs(schema_path: Path, workload: Workload, pathmind_max_ongoing: int) -> dict[str, ServerSpec]:
    # Nothing inherited may reconfigure a server: no stray POLICY_SERVER_*, RAY_ADDRESS, BENCH_*.
    drop = ("POLICY_SERVER_", "SCHEMA_PATH", "RAY_ADDRESS", "BENCH_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"SCHEMA_PATH": str(schema_path)}
    ours_env = env | {
        "POLICY_SERVER_BACKEND": "serve",
        "POLICY_SERVER_GATEWAY_METRICS_PORT": "0",
        "POLICY_SERVER_RAY_METRICS_PORT": str(free_port()),
    }
    ready = f"{workload.prefix}/health/ready"
    pathmind_env = env | {
        "BENCH_RAY_METRICS_PORT": str(free_port()),
        "BENCH_PATHMIND_MAX_ONGOING": str(pathmind_max_ongoing),
    }
    return {
        "ours": ServerSpec("ours", "app:app", ours_env, ready_path=ready),
        "ours-handle": ServerSpec("ours-handle", "app:app",
                                  ours_env | {"POLICY_SERVER_DIRECT_TRANSPORT": "false"}, ready_path=ready),
        "ours-local": ServerSpec("ours-local", "app:app", ours_env | {"POLICY_SERVER_BACKEND": "local"},
                                 ready_path=ready),
        "floor": ServerSpec("floor", "bench.baselines.plain_fastapi:create_app", env, factory=True),
        "pathmind": ServerSpec("pathmind", "bench.baselines.pathmind:create_app", pathmind_env, factory=True),
    }


def _ray_gcs_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == "gcs_server":
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def check_answer(server: RunningServer, endpoint: Endpoint, headers: dict[str, str]) -> None:
    """One request before the load: a wrong key or body fails here, with the server's answer."""
    request = urllib.request.Request(
        server.base_url + endpoint.path, data=json.dumps(endpoint.body).encode(), method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    where = f"{server.spec.name} POST {endpoint.path}"
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{where}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    ok = "action" in answer if endpoint.batch is None else len(answer.get("results", [])) == endpoint.batch
    if not ok:
        raise RuntimeError(f"{where}: unexpected answer {str(answer)[:300]}")


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    duration_s: int
    warmup_s: int
    repeat: int
    designs: tuple[str, ...]
    quiet_wait_s: float


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wait_for_quiet(server: RunningServer, max_wait_s: float) -> None:
    if max_wait_s <= 0:
        return
    started = time.monotonic()
    other = wait_for_quiet(server.pids(), max_wait_s, QUIET_CORES)
    waited = time.monotonic() - started
    if other >= QUIET_CORES:
        _log(f"  warning: other processes still use {other:.2f} cores after {waited:.0f} s; measuring anyway")
    elif waited > 5:
        _log(f"  waited {waited:.0f} s for other processes to go quiet")


def measure_design(design: str, spec: ServerSpec, workload: Workload, plan: Plan, wrk: str) -> list[Point]:
    """Start the design's server, warm every endpoint up, measure every point, stop the server."""
    others = _ray_gcs_pids()
    if others:
        _log(f"  note: another Ray instance is running on this machine (gcs_server {others})")
    started = time.monotonic()
    todo = endpoints(design, workload)
    runs: dict[tuple[Endpoint, int], list[Run]] = {}
    with running_server(spec, ROOT, RESULTS_DIR / "logs") as server:
        _log(f"  {design}: ready in {time.monotonic() - started:.1f} s at {server.base_url}")
        for ep in todo:
            check_answer(server, ep, workload.headers)
            run_wrk(wrk, server.base_url + ep.path, ep.body, workload.headers, WARMUP_CLIENTS, plan.warmup_s)
        for _ in range(plan.repeat):  # repeats interleaved: slow drifts of the machine spread out
            for ep in todo:
                for clients in ep.clients:
                    _wait_for_quiet(server, plan.quiet_wait_s)
                    with cpu_share(server.pids()) as cpu:
                        r = run_wrk(wrk, server.base_url + ep.path, ep.body, workload.headers, clients,
                                    plan.duration_s)
                    runs.setdefault((ep, clients), []).append(Run(r, cpu))
                    _log(f"  {design:8} {ep.path:22} {ep.label:>8} c={clients:<3} {r.requests_per_s:9.1f} "
                         f"req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  cores: server "
                         f"{cpu.server:.2f} wrk {cpu.client:.2f} other {cpu.other:.2f}"
                         + (f"  FAILED {r.failed}" if r.failed else ""))
    return [Point(design, ep.path, ep.batch, clients, tuple(rs)) for (ep, clients), rs in runs.items()]


# --- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetCheck:
    name: str
    passed: bool | None  # None: not measured
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"- **{verdict}** {self.name}: {self.detail}"


def ratio_target(
    name: str, ours: Point | None, other: Point | None, metric: Metric, need: float, at_most: bool = False
) -> TargetCheck:
    """``ours / other`` of ``metric`` at least (or at most) ``need``."""
    if ours is None or other is None:
        return TargetCheck(name, None, "not measured")
    a, b = ours.value(metric), other.value(metric)
    ratio = a / b
    unit, digits = {"requests_per_s": ("req/s", 0), "observations_per_s": ("obs/s", 0)}.get(metric, ("ms", 2))
    detail = (f"{a:,.{digits}f} vs {b:,.{digits}f} {unit} = {ratio:.2f}× "
              f"(target {'≤' if at_most else '≥'} {need:g}×)")
    return TargetCheck(name, ratio <= need if at_most else ratio >= need, detail)


def check_targets(res: Results) -> list[TargetCheck]:
    checks = [
        ratio_target("64 clients: ours ≥ 3× the Pathmind design, requests/s",
                     res.get("ours", 64), res.get("pathmind", 64), "requests_per_s", 3.0),
        ratio_target("64 clients: ours ≥ the floor, requests/s",
                     res.get("ours", 64), res.get("floor", 64), "requests_per_s", 1.0),
        ratio_target("1 client: ours p50 ≤ 3× the floor's p50",
                     res.get("ours", 1), res.get("floor", 1), "p50_ms", 3.0, at_most=True),
    ]
    checks += [
        ratio_target(
            f"{c} client{'s' if c > 1 else ''}: 256-observation batches ≥ 50× the observations/s "
            "of single requests", res.get("ours", c, 256), res.get("ours", c), "observations_per_s", 50.0,
        )
        for c in BATCH_CLIENTS
    ]
    return checks


def _cells(p: Point) -> str:
    rps = f"{p.value('requests_per_s'):,.0f}" + (f" ({p.failed} errors)" if p.failed else "")
    return f"{rps} | {p.value('p50_ms'):.2f} | {p.value('p99_ms'):.2f}"


def markdown(res: Results, checks: list[TargetCheck], meta: dict[str, Any]) -> str:
    out = [
        f"`wrk -t1 -c<clients> -d{meta['duration_s']}s --latency`, median of {meta['repeat']} run(s); "
        f"{meta['date']}, {meta['cpus']} CPUs, commit {meta['commit']}, {meta['schema']}",
        "",
        "**`/predict`, one observation per request**",
        "",
        "| design | clients | requests/s | p50 ms | p99 ms | server cores | other cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for design, label in DESIGNS.items():
        for c in SINGLE_CLIENTS:
            if p := res.get(design, c):
                cores = f"{p.cores('server'):.2f} | {p.cores('other'):.2f}"
                out.append(f"| {label} | {c} | {_cells(p)} | {cores} |")
    out += [
        "",
        "**ours relative to the baselines**",
        "",
        "| clients | req/s: ours / floor | req/s: ours / Pathmind | p50: ours / floor "
        "| p50: ours / Pathmind |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in SINGLE_CLIENTS:
        if ours := res.get("ours", c):
            baselines = (res.get("floor", c), res.get("pathmind", c))
            cells = [
                f"{ours.value(m) / b.value(m):.2f}×" if b else "–"
                for m in ("requests_per_s", "p50_ms") for b in baselines
            ]
            out.append(f"| {c} | " + " | ".join(cells) + " |")
    for design in ("ours", "ours-handle", "ours-local"):
        if not any(p.design == design for p in res.points):
            continue
        out += [
            "",
            f"**{DESIGNS[design]}: batch requests (`/predict/batch`) against single requests (`/predict`)**",
            "",
            "| observations per request | clients | requests/s | p50 ms | p99 ms | observations/s "
            "| × single requests | other cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in BATCH_CLIENTS:
            single = res.get(design, c)
            rows = [("single (`/predict`)", single)]
            rows += [(f"{n} (`/predict/batch`)", res.get(design, c, n)) for n in BATCH_SIZES]
            for label, p in rows:
                if p is not None:
                    obs = p.value("observations_per_s")
                    vs = f"{obs / single.value('observations_per_s'):.1f}×" if single else "–"
                    other = f"{p.cores('other'):.2f}"
                    out.append(f"| {label} | {c} | {_cells(p)} | {obs:,.0f} | {vs} | {other} |")
    out += [
        "",
        "Server cores: CPU used by the server's processes, Ray's included; other cores: by everything "
        "but the server and wrk (another job on the machine: a noisy point).",
        "",
        "**targets**",
        "",
    ]
    return "\n".join(out + [c.line() for c in checks])


def _git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "policy_server", "app.py")
        return git("rev-parse", "--short", "HEAD") + (" (server code modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured point (default 10)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="seconds of warm-up per endpoint (default 3)")
    parser.add_argument("--quick", action="store_true", help="3 s per point and 1 s warm-up: a smoke run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point, the median is reported")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help=f"before each point, wait up to this many seconds for other processes to use "
                        f"under {QUIET_CORES} cores (default 60; 0: never wait)")
    parser.add_argument("--pathmind-max-ongoing", type=int, default=100,
                        help="max_ongoing_requests of the Pathmind design's replica (default 100, Serve's "
                        "default in Pathmind's time; Ray 2.60's default, 5, makes that design collapse)")
    parser.add_argument("--designs", default=",".join(DEFAULT_DESIGNS),
                        help=f"comma-separated, out of {', '.join(DESIGNS)} (default: "
                        f"{','.join(DEFAULT_DESIGNS)})")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="measure nothing: print the tables and targets of a results file")
    args = parser.parse_args(argv)
    args.designs = tuple(d.strip() for d in args.designs.split(",") if d.strip())
    if unknown := set(args.designs) - set(DESIGNS):
        parser.error(f"unknown design(s) {sorted(unknown)}; choose from {list(DESIGNS)}")
    return args


def load_results(path: Path) -> tuple[Results, dict[str, Any]]:
    """The points and meta data of a results file written by this script."""
    data = json.loads(path.read_text())
    points = [
        Point(p["design"], p["path"], p["batch"], p["clients"], tuple(
            Run(WrkResult(**{k: v for k, v in r.items() if k != "cores"}), CpuShare(**r["cores"]))
            for r in p["runs"]
        ))
        for p in data["points"]
    ]
    return Results(points), data["meta"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        res, meta = load_results(args.report)
        print(markdown(res, check_targets(res), meta))
        return 0
    plan = Plan(
        duration_s=3 if args.quick else args.duration,
        warmup_s=args.warmup if args.warmup is not None else (1 if args.quick else 3),
        repeat=max(1, args.repeat),
        designs=args.designs,
        quiet_wait_s=args.quiet_wait,
    )
    wrk = find_wrk()
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "command": "python bench/serving.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s,
        "repeat": plan.repeat,
        "quiet_wait_s": plan.quiet_wait_s,
        "pathmind_max_ongoing_requests": args.pathmind_max_ongoing,
    }
    res = Results()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        schema_path, fallback = find_schema(Path(tmp))
        meta["schema"] = (
            "fallback MLP 4→64→64→2 with the cartpole fields" if fallback
            else EXAMPLE_SCHEMA.relative_to(ROOT).as_posix()
        )
        if fallback:
            _log(f"note: {EXAMPLE_SCHEMA.relative_to(ROOT)} is missing; serving a {meta['schema']} "
                 f"({schema_path})")
        workload = make_workload(schema_path, max(BATCH_SIZES))
        specs = server_specs(schema_path, workload, args.pathmind_max_ongoing)
        for design in plan.designs:
            _log(f"{design}: starting uvicorn {specs[design].app}")
            res.points += measure_design(design, specs[design], workload, plan, wrk)
    checks = check_targets(res)
    table = markdown(res, checks, meta)
    print(table)
    payload = {
        "meta": meta,
        "points": [p.as_dict() for p in res.points],
        "targets": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks],
        "markdown": table,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for out in filter(None, [RESULTS_DIR / "serving.json", args.json]):
        out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        _log(f"results written to {out}")
    return 1 if any(p.failed for p in res.points) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared benchmark harness: timing, copy bandwidth, results.csv and RESULTS.md.

Every benchmark of the project appends rows to ``benchmarks/results.csv`` with the columns
``date,commit,device,benchmark,provider,shape,dtype,median_us,gbps,speedup`` and re-renders
``benchmarks/RESULTS.md`` from it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_CSV = HERE / "results.csv"
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_NOTES = HERE / "results_notes.md"  # hand-written context, rendered under the header
COLUMNS = ["date", "commit", "device", "benchmark", "provider", "shape", "dtype", "median_us", "gbps", "speedup"]


def device_name(device: torch.device, threads: int | None = None) -> str:
    """The device column of ``results.csv``: the GPU's name, or on the CPU the machine, its cores and the threads
    the timed work ran with (``threads``; torch's own by default; 0 where each row's provider names its own). Rows
    before 2026-12-07 03:xx read ``cpu (x86_64, 2 threads)`` where 2 was the core count, not the threads used
    (``results_notes.md``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads() if threads is None else threads
    used = f", {threads} thread{'' if threads == 1 else 's'}" if threads else ""
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores{used})"


def commit() -> str:
    """Short hash of HEAD (``-dirty`` with uncommitted changes); ``IVG_BENCH_COMMIT`` overrides it where the
    tree travels without its .git (a lent GPU machine)."""
    if os.environ.get("IVG_BENCH_COMMIT"):
        return os.environ["IVG_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results.csv", ":(top,exclude)benchmarks/RESULTS.md"],  # a run's own output
                               cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_us(fn, device: torch.device, *, min_time_s: float = 0.2, max_reps: int = 200, graph: bool = False) -> float:
    """Median microseconds of ``fn()``: triton's do_bench on CUDA (``graph=True``: replays of a CUDA
    graph of ``fn``, i.e. the kernels' time without the host's launch gaps), repeated wall-clock runs
    on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        if graph:
            fn()  # compile outside the capture
            torch.cuda.synchronize()
            return 1000.0 * do_bench_cudagraph(fn, rep=100, return_mode="median")
        return 1000.0 * do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def kernel_us(fn, calls: int = 20) -> dict:
    """Median GPU microseconds of each kernel ``fn()`` launches, by kernel name, from the profiler (CUDA): each
    kernel's own time, without the launch gaps between kernels that a graph replay's time includes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return _kernel_times(prof)


def _kernel_times(prof) -> dict:
    """Each kernel's median time (us) from a profile's device events; where a torch version lists none there, the
    mean from its averages (the table profile_decode.py prints, which GPU runs have shown), with a line saying so."""
    import collections

    cuda = torch.autograd.DeviceType.CUDA
    times = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == cuda and e.device_time > 0:
            times[e.name].append(e.device_time)
    if times:
        return {name: statistics.median(v) for name, v in times.items()}
    means = {e.key: e.self_device_time_total / e.count for e in prof.key_averages()
             if e.device_type == cuda and e.count and e.self_device_time_total > 0}
    print(f"kernel_us: the profile's events held no kernel times; {len(means)} kernels' means from its averages",
          flush=True)
    return means


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device-to-device copy: bytes read + written per second, in GB/s."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device)
    return 2 * nbytes / (us * 1e-6) / 1e9


def append_results(rows: list[dict]) -> None:
    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    render_markdown()
    print(f"appended {len(rows)} rows to {RESULTS_CSV}")


def render_markdown() -> None:
    """RESULTS.md: one table per (date, commit, device, benchmark), newest first."""
    if not RESULTS_CSV.exists():
        return
    with RESULTS_CSV.open() as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["date"], r["commit"], r["device"], r["benchmark"]), []).append(r)
    lines = [
        "# Benchmark results",
        "",
        "Rendered from `results.csv` by `benchmarks/harness.py`; do not edit by hand.",
        "GPU numbers count for the GPU targets; CPU numbers only for CPU targets.",
        "",
    ]
    if all(r["device"].startswith("cpu") for r in rows):
        lines[-1:-1] = ["No GPU run is recorded yet: every GPU target is still open."]
    if RESULTS_NOTES.exists():
        lines += [RESULTS_NOTES.read_text().strip(), ""]
    for (date, sha, dev, bench), rs in sorted(groups.items(), key=lambda kv: kv[0][0], reverse=True):
        lines += [f"## {bench} — {dev} — {date} — commit {sha}", ""]
        lines += ["| provider | shape | dtype | median us | GB/s | speed-up |", "|---|---|---|---:|---:|---:|"]
        for r in rs:
            lines.append(f"| {r['provider']} | {r['shape']} | {r['dtype']} | {r['median_us']} | {r['gbps']} | {r['speedup']} |")
        lines.append("")
    RESULTS_MD.write_text("\n".join(lines))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def print_table(rows: list[dict], copy_gbps: float) -> None:
    print(f"{'provider':<18} {'shape':<34} {'median us':>10} {'GB/s':>8} {'%copy':>6} {'speed-up':>9}")
    for r in rows:
        frac = f"{100 * float(r['gbps']) / copy_gbps:5.1f}" if r["gbps"] != "" else ""
        print(f"{r['provider']:<18} {r['shape']:<34} {r['median_us']:>10} {r['gbps']:>8} {frac:>6} {r['speedup']:>9}")

"""Host work of the decode loop at a GPU's batch size, measured on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_loop_host.py [--record]

On a GPU the forwards replay CUDA graphs and the sampler is two kernels, so a decode step's host work
is the loop's own: its bookkeeping at chunk boundaries (the read of the drawn tokens and values, ranking
and pruning, forking) runs while the device waits. This runs ``IVGDecoder`` in mode ``ivg`` (W = K = 4,
L = 5, 32 tokens, no EOS, the GPU's ``read_every`` 8) over 64 prompts, 1,024 rows, with models too
small to cost much (``host-probe`` of ``benchmarks/random_models.py``: one layer, width 8, a 64-token
vocabulary), and times the loop's units per call by wrapping them (``ivg.decode_loop.DecodeLoop``):
``read``, ``prune``, ``fork`` and the lazy token RM's ``score_rm_before_read`` (its tiny forward
included) at each chunk boundary; the best of five runs. The forwards and the plain-torch sampler run
on the CPU here and are reported apart (``forwards``, ``sample``); on a GPU they are graph replays and
kernel launches. ``read to launch``: the host's time from the start of each read to the first forward
after it, the part of a boundary the device waits through (it has run every step queued before the
read); what comes after that launch overlaps with the device's work.

``--prompts 256 --batch-prompts 64 --eos 6`` decodes more prompts than the rows hold, with six EOS ids,
so that prompts finish at different steps and waiting ones take their rows (continuous batching): the
figure to watch is then the host reads per step (each a synchronisation with the device on a GPU).
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import torch  # noqa: E402

from benchmarks import harness, random_models  # noqa: E402

UNITS = ("read", "prune", "fork", "score_rm_before_read", "sample")


def _timed(cls, name: str, times: dict, calls: collections.Counter):
    """Wrap ``cls.name`` so that each call adds its seconds to ``times[name]``; returns the original."""
    real = cls.__dict__[name]

    def unit(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            times[name] += time.perf_counter() - t0
            calls[name] += 1

    setattr(cls, name, unit)
    return real


GAP = "read to launch"


def _time_read_to_launch(times: dict, calls: collections.Counter):
    """Add to ``times[GAP]`` the seconds from the start of each ``DecodeLoop.read`` to the start of the
    next ``PagedModel`` forward; returns a function that undoes the wrapping."""
    from ivg import decode_loop
    from ivg.paged_model import PagedModel

    loop = decode_loop.DecodeLoop
    read, release, call = loop.read, loop.release, PagedModel.__call__
    started = []

    def timed_read(*a, **k):
        started[:] = [time.perf_counter()]
        return read(*a, **k)

    def timed_release(*a, **k):  # the run's last read (at the length limit) launches nothing after it
        started.clear()
        return release(*a, **k)

    def timed_call(*a, **k):
        if started:
            times[GAP] += time.perf_counter() - started.pop()
            calls[GAP] += 1
        return call(*a, **k)

    loop.read, loop.release, PagedModel.__call__ = timed_read, timed_release, timed_call

    def restore():
        loop.read, loop.release, PagedModel.__call__ = read, release, call

    return restore


def main(argv=None) -> int:
    from ivg import decode_loop
    from ivg.api import load_models
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch-prompts", type=int, default=None, help="prompts decoded together (default all)")
    ap.add_argument("--eos", type=int, default=0, help="EOS ids (the first N ids from 1): prompts end at other steps")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ivg-loop-host-"))
    paths = random_models.build(work, "host-probe", "float32")["ours"]
    prompts = random_models.prompts(args.prompts, "host-probe", 4242)
    models = load_models(paths["base"], tuned=[paths["tuned"]], ref=[paths["ref"]], beta=[1.0],
                         token_rm=paths["rm"], token_rm_weight=0.0)
    batch = args.batch_prompts or args.prompts
    dec = IVGDecoder(models, max_batch_prompts=batch, read_every=8)
    opts = DecodeOptions(mode="ivg", width=4, successors=4, chunk_len=5, max_new_tokens=32, temperature=0.7,
                         eos_token_ids=tuple(range(1, args.eos + 1)))
    times: dict = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    originals = {name: _timed(decode_loop.DecodeLoop, name, times, calls) for name in UNITS}
    restore_gap = _time_read_to_launch(times, calls)
    try:
        dec.generate(prompts, opts)  # warm-up
        best = None
        for _ in range(args.runs):
            times.clear()
            calls.clear()
            dec.generate(prompts, opts)
            run = (dec.last_stats.wall_s, dict(times), dict(calls), dec.last_stats)
            if best is None or run[0] < best[0]:
                best = run
    finally:  # the loop as it was (a caller in the same process, a test, keeps using it)
        restore_gap()  # (it wrapped the timed read: undone first)
        for name, real in originals.items():
            setattr(decode_loop.DecodeLoop, name, real)
    wall, times, calls, stats = best
    dev_name, date, sha = harness.device_name(torch.device("cpu")), harness.now(), harness.commit()
    rows_n = batch * 16
    print(f"# bench_loop_host on {dev_name}, torch {torch.__version__}, commit {sha}: {args.prompts} prompts, "
          f"{rows_n} rows, {stats.steps} steps, {calls.get('read', 0)} reads ({stats.host_reads} host reads in all, "
          f"{stats.host_reads / stats.steps:.2f} per step); run {wall * 1e3:.0f} ms, forwards "
          f"{stats.forward_s * 1e3:.0f} ms (CPU compute here, graph replays on a GPU)")
    setting = f"ivg W=K=4 L=5,prompts={args.prompts},rows={rows_n},steps={stats.steps},host_reads={stats.host_reads}"
    if args.eos:
        setting += f",eos ids={args.eos}"
    rows = []
    for name in UNITS + (GAP,):
        if not calls.get(name):
            continue
        per = times[name] / calls[name]
        print(f"{name:<22} {calls[name]:3d} calls  {per * 1e3:7.2f} ms per call  {times[name] * 1e3:7.1f} ms in all")
        rows.append(dict(date=date, commit=sha, device=dev_name, benchmark="loop_host", provider=name,
                         shape=f"{setting},calls={calls[name]},host-probe models",
                         dtype="float32", median_us=f"{per * 1e6:.0f}", gbps="", speedup=""))
    if args.record:
        harness.append_results(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

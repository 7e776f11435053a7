"""``benchmarks/plot_results.py``: each panel shows its benchmark's newest GPU run (until 2026-12-07 both panels took
the hour of the newest GPU row, so the decode panel stayed empty whenever the last run measured no decoding)."""
from benchmarks.plot_results import newest_run


def _row(date, benchmark, commit, device="NVIDIA H200"):
    return dict(date=date, benchmark=benchmark, commit=commit, device=device)


def test_each_benchmark_takes_its_own_newest_run():
    gpu = [_row("2026-11-22 18:40 UTC", "decode", "aaa", "NVIDIA H100"),
           _row("2026-11-22 18:49 UTC", "decode", "bbb", "NVIDIA H100"),
           _row("2026-11-20 10:00 UTC", "decode", "old", "NVIDIA H100"),
           _row("2026-12-04 16:39 UTC", "sampling", "ccc"),
           _row("2026-12-04 15:10 UTC", "sampling", "earlier")]
    dec, label = newest_run(gpu, "decode")
    assert [r["commit"] for r in dec] == ["aaa", "bbb"]  # the newest row's hour
    assert label == "NVIDIA H100, 2026-11-22, bbb"  # named by its newest row
    samp, label = newest_run(gpu, "sampling")
    assert [r["commit"] for r in samp] == ["ccc"] and label == "NVIDIA H200, 2026-12-04, ccc"
    assert newest_run(gpu, "speculative") == ([], "no rows")

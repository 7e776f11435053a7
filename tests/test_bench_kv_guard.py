"""``benchmarks/bench_kv.py``'s beam-group rows: each path is compared with the reference attention before it is
timed, and a path that computes something else is marked so that its rows are not recorded."""
import torch

import ivg_kernels
from benchmarks import bench_kv


def test_the_beam_group_paths_match_the_reference():
    rows = bench_kv.bench_beam_group(torch.device("cpu"), beams=4, prompt=48, own=8)
    assert rows and not any(r["_wrong"] for r in rows)


def test_a_beam_group_path_that_computes_something_else_is_not_recorded(monkeypatch):
    real = ivg_kernels.shared_prefix_decode_attention
    monkeypatch.setattr(ivg_kernels, "shared_prefix_decode_attention", lambda *a, **k: real(*a, **k) * 1.5)
    rows = bench_kv.bench_beam_group(torch.device("cpu"), beams=4, prompt=48, own=8)
    assert {r["provider"] for r in rows if r["_wrong"]} == {"shared-prefix-reference-eager"}

"""``benchmarks/harness.device_name``: the CPU label of ``results.csv`` names the threads a run used, apart from
the machine's cores (the label once gave the core count as "threads" for runs made with one thread)."""
import os

import torch

from benchmarks import harness


def test_the_cpu_label_names_cores_and_the_threads_used():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        label = harness.device_name(torch.device("cpu"))
        assert label.endswith(f", {os.cpu_count()} cores, 1 thread)"), label
        assert harness.device_name(torch.device("cpu"), threads=3).endswith(f"{os.cpu_count()} cores, 3 threads)")
        assert harness.device_name(torch.device("cpu"), threads=0).endswith(f", {os.cpu_count()} cores)")  # per row
    finally:
        torch.set_num_threads(before)

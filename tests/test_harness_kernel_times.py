"""``benchmarks/harness.kernel_us``'s reading of a profile (tune_stage1.py and diagnose_beam_group.py time each kernel
by it on a GPU): each kernel's median over its launches from the device events, and where a torch version lists no
device times there, the mean from the profile's averages. Profiles stood in for by plain objects: the CPU has none."""
from types import SimpleNamespace

import torch

from benchmarks import harness

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(name, device_type, device_time):
    return SimpleNamespace(name=name, device_type=device_type, device_time=device_time)


def _average(key, device_type, total, count):
    return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=total, count=count)


class _Profile:
    def __init__(self, events, averages):
        self._events, self._averages = events, averages

    def events(self):
        return self._events

    def key_averages(self):
        return self._averages


def test_each_kernel_gets_the_median_of_its_launches_and_host_events_are_left_out():
    events = [_event("_stage1_kernel", CUDA, t) for t in (5.0, 1.0, 3.0)] + [
        _event("_stage2_kernel", CUDA, 2.0), _event("_stage2_kernel", CUDA, 4.0),
        _event("aten::empty", CPU, 9.0), _event("cudaLaunchKernel", CPU, 0.0)]
    got = harness._kernel_times(_Profile(events, averages=[]))
    assert got == {"_stage1_kernel": 3.0, "_stage2_kernel": 3.0}


def test_without_device_times_in_the_events_the_averages_give_each_kernels_mean(capsys):
    events = [_event("_stage1_kernel", CUDA, 0.0), _event("aten::empty", CPU, 9.0)]
    averages = [_average("_stage1_kernel", CUDA, 30.0, 10), _average("_stage2_kernel", CUDA, 8.0, 4),
                _average("aten::empty", CPU, 0.0, 10), _average("cudaLaunchKernel", CPU, 0.0, 20)]
    got = harness._kernel_times(_Profile(events, averages))
    assert got == {"_stage1_kernel": 3.0, "_stage2_kernel": 2.0}
    assert "held no kernel times" in capsys.readouterr().out

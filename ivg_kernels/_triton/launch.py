"""Eager launches of compiled Triton kernels without Triton's per-call Python layer.

``kernel[grid](*args)`` costs about 35 us of host time per launch on Triton 3.6-3.9, most of it
outside the launch itself: a check that every global constant the kernel reads is unchanged
(``tl.constexpr`` comparisons, about half of it), keyword and option processing, and the cache key.
:class:`DirectLaunch` keeps what decides which compiled kernel runs, Triton's own argument binder
(dtypes, 16-byte alignment of pointers, divisibility of integers, constexprs), and caches the compiled
kernel per specialisation itself; a new specialisation takes Triton's normal path once (compiling if
needed), later calls go straight to the compiled kernel's launcher, with the launch hooks profilers
install. Under ``TRITON_INTERPRET=1`` it is the plain ``kernel[grid]``.

Module-level constants the kernels read are treated as constant for the life of the process (Triton
would raise if one were reassigned after compiling; nothing here reassigns them), and so are the
options Triton reads from its knobs at each launch (debug mode, instrumentation): a specialisation
keeps those of its first launch.
"""
from __future__ import annotations

from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class DirectLaunch:
    """``DirectLaunch(kernel)[grid](*args, **constexprs_and_options)``: launch like ``kernel[grid]``."""

    __slots__ = ("fn", "kernels")

    def __init__(self, fn):
        self.fn = fn
        self.kernels = {}  # (device, specialisation, options) -> compiled kernel

    def __getitem__(self, grid):
        if not isinstance(self.fn, JITFunction):  # the interpreter's kernels
            return self.fn[grid]
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        device = driver.active.get_current_device()
        binder = self.fn.device_caches[device][4]
        bound, specialization, options = binder(*args, **kwargs)
        key = (device, tuple(specialization), str(options))
        kernel = self.kernels.get(key)
        if kernel is None:  # Triton's own path: compiles when it must, launches, returns the kernel
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):  # an asynchronous compilation's future
                kernel = kernel.result()
            self.kernels[key] = kernel
            return kernel
        stream = driver.active.get_current_stream(device)
        values = bound.values()
        grid = tuple(grid) + (1, 1)
        enter = knobs.runtime.launch_enter_hook  # None (Triton 3.6) or a chain of hooks, often empty (3.9)
        metadata = (kernel.launch_metadata(grid[:3], stream, *values)
                    if enter is not None and getattr(enter, "calls", True) else None)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, metadata, enter,
                   knobs.runtime.launch_exit_hook, *values)
        return kernel


def cdiv(a, b):
    """``ceil(a / b)`` for host integers (``triton.cdiv`` costs microseconds per call: it unwraps constexprs)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= ``n`` (>= 1), by bit operations, so symbolic sizes work too."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def direct(fn) -> DirectLaunch:
    """The :class:`DirectLaunch` of ``fn``, made once per kernel."""
    launcher = _LAUNCHERS.get(fn)
    if launcher is None:
        launcher = _LAUNCHERS[fn] = DirectLaunch(fn)
    return launcher


_LAUNCHERS: dict = {}

"""Eager launches of compiled Triton kernels without Triton's per-call Python layer.

``kernel[grid](*args)`` costs about 35 us of host time per launch on Triton 3.6-3.9, most of it
outside the launch itself: a check that every global constant the kernel reads is unchanged
(``tl.constexpr`` comparisons, about half of it), keyword and option processing, and the cache key.
:class:`DirectLaunch` keeps what decides which compiled kernel runs, Triton's own argument binder
(dtypes, 16-byte alignment of pointers, divisibility of integers, constexprs), and caches the compiled
kernel per specialisation itself; a new specialisation takes Triton's normal path once (compiling if
needed), later calls go straight to the compiled kernel's launcher, with the launch hooks profilers
install. Under ``TRITON_INTERPRET=1`` it is the plain ``kernel[grid]``.

A launcher that knows what its arguments' specialisation depends on can pass a ``key`` as well
(:meth:`DirectLaunch.key`): a later call with an equal key skips the binder too and launches the
kernel that key's first call got. The caller vouches that equal keys mean equal specialisations;
with ``CHECK_KEYS`` set (the tests) every keyed call is checked against the binder.

Module-level constants the kernels read are treated as constant for the life of the process (Triton
would raise if one were reassigned after compiling; nothing here reassigns them), and so are the
options Triton reads from its knobs at each launch (debug mode, instrumentation): a specialisation
keeps those of its first launch.
"""
from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction


CHECK_KEYS = False  # check every keyed launch against Triton's binder (tests)
# Whether remembered eager calls that launch straight to their bound kernels (KeyedKernels.by_address: the sampler's,
# the paged decode attention's and the shared-prefix attention's) pass their tensors' addresses instead of the
# tensors. Triton's launchers (3.6's generated one and 3.9's) call each tensor argument's data_ptr() and then the
# driver's cuPointerGetAttribute, on every launch, and take an int as the pointer itself: a sampler call passes 23
# tensors, a decode call of two kernels 15, a shared-prefix call 22 (the attention's two partial buffers, by
# address, need no views either). The ints cost Python data_ptr() calls instead (the sampler: about 2 us a call on
# the 2-core CPU with the launches stubbed). Which costs less on a GPU's host is owed to a GPU
# (`benchmarks/profile_eager.py` times both ways); off until then. The results are the same.
POINTERS_AS_INTS = False
DATA_PTR = torch.Tensor.data_ptr  # (an argument's address, for the calls that pass addresses)


class DirectLaunch:
    """``DirectLaunch(kernel)[grid](*args, **constexprs_and_options)``: launch like ``kernel[grid]``."""

    __slots__ = ("fn", "kernels", "by_key")

    def __init__(self, fn):
        self.fn = fn
        self.kernels = {}  # (device, specialisation, options) -> compiled kernel
        self.by_key = {}  # (device, caller's key) -> (compiled kernel, names of the parameters passed by keyword)

    def __getitem__(self, grid):
        if not isinstance(self.fn, JITFunction):  # the interpreter's kernels
            return self.fn[grid]
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def key(self, key) -> "_Keyed":
        """``direct(kernel).key(key)[grid](*args, **constexprs_and_options)``: like ``[grid]``; calls with an
        equal ``key`` (hashable) share one specialisation and options, so after the first only the
        arguments are passed on. Every argument but the constexprs and options positional."""
        return _Keyed(self, key) if isinstance(self.fn, JITFunction) else self.fn  # the interpreter's: fn[grid]

    def run(self, grid, args, kwargs, key=None):
        device = current_device()
        hit = self.by_key.get((device, key)) if key is not None else None
        if hit is not None and not CHECK_KEYS:
            kernel, names = hit
            return self._launch(kernel, grid, device, args + tuple(kwargs[name] for name in names))
        binder = self.fn.device_caches[device][4]
        bound, specialization, options = binder(*args, **kwargs)
        spec = (device, tuple(specialization), str(options))
        kernel = self.kernels.get(spec)
        if hit is not None and hit[0] is not kernel:
            raise AssertionError(f"{self.fn.__name__}: launch key {key!r} stands for two specialisations")
        if kernel is None:  # Triton's own path: compiles when it must, launches, returns the kernel
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):  # an asynchronous compilation's future
                kernel = kernel.result()
            self.kernels[spec] = kernel
        else:
            self._launch(kernel, grid, device, tuple(bound.values()))
        names = list(bound)[len(args):]  # the constexprs, in the order the launcher takes them
        if key is not None and hit is None and all(name in kwargs for name in names):
            self.by_key[(device, key)] = (kernel, names)
        return kernel

    @staticmethod
    def _launch(kernel, grid, device, values, stream=None):
        if stream is None:
            stream = driver.active.get_current_stream(device)
        grid = tuple(grid) + (1, 1)
        enter = knobs.runtime.launch_enter_hook  # None (Triton 3.6) or a chain of hooks, often empty (3.9)
        metadata = (kernel.launch_metadata(grid[:3], stream, *values)
                    if enter is not None and getattr(enter, "calls", True) else None)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, metadata, enter,
                   knobs.runtime.launch_exit_hook, *values)
        return kernel


class KeyedKernels:
    """The kernels one launcher runs for one launch key (:meth:`DirectLaunch.key`), with their constexprs and
    options, bound once launched: after a first call through ``DirectLaunch.key`` (the binder, compiling if
    need be), later calls go straight to the compiled kernels' launchers with the constexprs' values in the
    order those take them. Subclasses (a launcher's plan for one kind of call) hold no tensor."""

    __slots__ = ("key", "fns", "consts", "bound", "compiled")

    def __init__(self, key, fns, consts):
        self.key, self.fns, self.consts = key, tuple(fns), tuple(consts)
        self.bound = {}  # device -> ((compiled kernel, constexpr values), ...) per kernel
        self.compiled = isinstance(self.fns[0], JITFunction)  # (the interpreter's kernels are called as they are)

    def current(self) -> bool:
        """Whether the module settings this launch was planned with still hold (subclasses whose plan reads some)."""
        return True

    def ready(self, via):
        """``(device, bound kernels)`` when a call now goes straight to the compiled kernels' launchers (its kernels
        bound on the current device by an earlier call through ``direct``, and ``CHECK_KEYS`` off), else None. Only
        such a call may pass its pointer arguments as ints (Triton's binder, which the other calls go through,
        specialises on the tensors)."""
        if not self.compiled or via is not direct or CHECK_KEYS:
            return None
        device = current_device()
        bound = self.bound.get(device)
        return None if bound is None else (device, bound)

    def by_address(self, via):
        """:meth:`ready`'s answer where ``POINTERS_AS_INTS`` is set (the call may then pass addresses), else None."""
        return self.ready(via) if POINTERS_AS_INTS else None

    def launch(self, via, launches, ready=None) -> None:
        """Launch ``launches``, one ``(grid, args)`` per kernel in ``fns``' order. ``via``: the caller module's
        ``direct`` at call time (a test or benchmark may swap it for Triton's own path; then, and with
        ``CHECK_KEYS``, every call goes through it). ``ready``: what :meth:`ready` returned for this call, where the
        caller asked (None: asked here)."""
        ready = ready or self.ready(via)
        if ready is not None:
            device, bound = ready
            stream = driver.active.get_current_stream(device)  # (once for the launches: they share it)
            for (kernel, tail), (grid, args) in zip(bound, launches):
                DirectLaunch._launch(kernel, grid, device, args + tail, stream)
            return
        compiled = self.compiled
        device = current_device() if compiled else None
        for fn, consts, (grid, args) in zip(self.fns, self.consts, launches):
            via(fn).key(self.key)[grid](*args, **consts)
        if compiled and via is direct:
            hits = [direct(fn).by_key.get((device, self.key)) for fn in self.fns]
            if None not in hits:
                self.bound[device] = tuple((kernel, tuple(consts[name] for name in names))
                                           for (kernel, names), consts in zip(hits, self.consts))


class Plans:
    """Launch key -> a launcher's plan for that kind of call (its :class:`KeyedKernels`), made on first use, bounded:
    a process that launches at ever new shapes starts over."""

    __slots__ = ("table", "limit")

    def __init__(self, limit: int = 4096):
        self.table, self.limit = {}, limit

    def get(self, key, make):
        """The plan of ``key``, made by ``make()`` the first time."""
        made = self.table.get(key)
        if made is None:
            if len(self.table) >= self.limit:
                self.table.clear()
            made = self.table[key] = make()
        return made


def current_device():
    """The device Triton launches on (the current CUDA device)."""
    return driver.active.get_current_device()


class _Keyed:
    __slots__ = ("launcher", "key")

    def __init__(self, launcher: DirectLaunch, key):
        self.launcher, self.key = launcher, key

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launcher.run(grid, args, kwargs, self.key)


def tensor_key(*tensors) -> tuple:
    """What Triton's specialisation of pointer arguments depends on, for launch keys: each tensor's dtype
    and whether it starts on 16 bytes (None for an absent one)."""
    return tuple(None if t is None else (t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


def int_class(x) -> tuple:
    """What Triton's specialisation of an integer argument can depend on, for launch keys: its type (by
    range), whether it is 1 and whether 16 divides it (a non-int: its type)."""
    if type(x) is not int:
        return (type(x),)
    return (-0x80000000 <= x < 0x80000000, x < 0x8000000000000000, x == 1, x % 16 == 0)


def packed(sizes) -> tuple[list[int], int]:
    """Byte offsets of buffers of ``sizes`` bytes laid end to end in one allocation, each starting on 16 bytes
    (the alignment a fresh allocation has, which Triton's specialisation sees), and the total bytes."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // 16) * 16
    return offsets, at


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
    launcher = _LAUNCHERS.get(id(fn))  # by identity: hashing a JITFunction costs more than the rest of this
    if launcher is None:
        launcher = _LAUNCHERS[id(fn)] = DirectLaunch(fn)
    return launcher


_LAUNCHERS: dict = {}  # id(kernel) -> DirectLaunch (the kernels are module-level: they live as long)

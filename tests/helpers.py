"""Shared test helpers: one tolerance table, a verbose allclose, triton availability, compiled scripts."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# (atol, rtol) for values computed in float32 from inputs of each dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),  # inputs are upcast exactly; the arithmetic is float32 either way
    torch.float16: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parent.parent


def _has_ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


requires_ptxas = pytest.mark.skipif(not _has_ptxas(), reason="Triton without its bundled ptxas")


def run_compiled(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` as a script from the repository root without ``TRITON_INTERPRET``, so that its kernels
    compile (a script file: Triton reads kernels' source from their file), as benchmarks/compile_offline.py's
    stand-in driver lets them on a machine without a GPU."""
    script = tmp_path / "compiled.py"
    script.write_text("import sys; sys.path.insert(0, 'benchmarks'); sys.path.insert(0, '.')\n" + textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=torch.float32, what: str = "", scale: float = 1.0):
    """allclose that reports the worst element and treats NaN/inf mismatches as failures."""
    atol, rtol = TOLERANCES[dtype]
    atol, rtol = atol * scale, rtol * scale
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero().tolist()[:5]} vs {nan_e.nonzero().tolist()[:5]}"
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(inf_a, inf_e) and torch.equal(actual[inf_a], expected[inf_e]), f"{what}: inf positions differ"
    fin = ~(nan_a | inf_a)
    diff = (actual[fin] - expected[fin]).abs()
    bound = atol + rtol * expected[fin].abs()
    if diff.numel() and (diff > bound).any():
        i = int((diff - bound).argmax())
        raise AssertionError(
            f"{what}: max excess at flat {i}: actual {actual[fin][i].item()!r} expected {expected[fin][i].item()!r} "
            f"(|diff| {diff[i].item():.3e} > {bound[i].item():.3e})"
        )


def args_to(a, device=DEVICE):
    """A copy of a SampleArgs with every tensor moved to ``device``."""
    import dataclasses

    def mv(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, list):
            return [mv(y) for y in x]
        return x

    return dataclasses.replace(a, **{f.name: mv(getattr(a, f.name)) for f in dataclasses.fields(a)})


class Counted:
    """Counts the calls of a Triton kernel helper (the interpreter calls helpers through the module's globals)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


FALLBACKS = ("_pool_draw", "_fallback_threshold")  # the sampler's exact fallback: one call per row, either path


class FallbackCounters(dict):
    """``{helper name: Counted}`` of the sampler's fallback paths."""

    def total(self) -> int:
        """Fallback rows so far, either path."""
        return sum(c.calls for c in self.values())

    def reset(self) -> None:
        for c in self.values():
            c.calls = 0


def count_fallbacks(monkeypatch) -> FallbackCounters:
    """Counters of the sampler's two fallback paths, one call per fallback row (interpreter only: compiled
    kernels resolve their helpers at compile time)."""
    from ivg_kernels._triton import sampling_kernels as sk

    counters = FallbackCounters()
    for name in FALLBACKS:
        counters[name] = Counted(getattr(sk, name))
        monkeypatch.setattr(sk, name, counters[name])
    return counters


interpreter_only = pytest.mark.skipif(DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="counts calls inside the kernel: interpreter only")


def count_checks(monkeypatch, module, check: str, remembered) -> list:
    """Counts the calls of ``module.check`` (a function the full path of a public function runs on every checked
    call) and starts ``remembered`` (an ``ivg_kernels._eager.Calls``) from no remembered call: the tests of
    remembered eager calls count how many calls were checked."""
    calls = []
    real = getattr(module, check)
    monkeypatch.setattr(module, check, lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(remembered, "table", {})
    return calls


def holds_tensor(x) -> bool:
    """Whether ``x`` holds a tensor: itself, inside tuples, lists and dicts, or in an object's ``__slots__`` (the
    remembered launches): the tests of remembered eager calls check that nothing remembered keeps one alive."""
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list, dict)):
        return any(holds_tensor(y) for y in (x.values() if isinstance(x, dict) else x))
    slots = [name for cls in type(x).__mro__ for name in getattr(cls, "__slots__", ())]
    return any(holds_tensor(getattr(x, name, None)) for name in slots)

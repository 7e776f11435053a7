"""Bad input gets a ValueError naming the argument; backends are chosen as documented."""
import re

import pytest
import torch

import ivg_kernels
from ivg_kernels import guided_sample

from .helpers import DEVICE, requires_triton

L = torch.zeros(2, 10)


def call(**kw):
    args = dict(logits=L, guides=(), seed=0, offset=0, backend="reference")
    args.update(kw)
    return guided_sample(args.pop("logits"), args.pop("guides"), **args)


BAD = [
    (dict(logits=torch.zeros(10)), "logits", "2-D"),
    (dict(logits=torch.zeros(2, 3, 4)), "logits", "2-D"),
    (dict(logits=torch.zeros(2, 10, dtype=torch.int64)), "logits", "dtype"),
    (dict(logits=[[0.0]]), "logits", "torch.Tensor"),
    (dict(logits=torch.zeros(2, 0)), "logits", "at least one column"),
    (dict(logits=torch.zeros(10, 2).t()), "logits", "unit stride"),
    (dict(guides=[(torch.zeros(3, 10), 1.0)]), r"guides\[0\]\[0\]", "2 rows"),
    (dict(guides=[(torch.zeros(2, 10, 1), 1.0)]), r"guides\[0\]\[0\]", "2-D"),
    (dict(guides=[torch.zeros(2, 10)]), r"guides\[0\]", "pair"),
    (dict(guides=torch.zeros(2, 10)), "guides", "sequence"),
    (dict(guides=[(torch.zeros(2, 10), 1.0)] * 7), "guides", "at most 6"),
    (dict(guides=[(torch.zeros(2, 10), "x")]), r"guides\[0\]\[1\]", "float"),
    (dict(guides=[(torch.zeros(2, 10), torch.ones(3))]), r"guides\[0\]\[1\]", "2 rows"),
    (dict(guides=[(torch.zeros(2, 10), float("nan"))]), r"guides\[0\]\[1\]", "finite"),
    (dict(vocab_size=11), "vocab_size", "at most 10"),
    (dict(guides=[(torch.zeros(2, 8), 1.0)], vocab_size=9), "vocab_size", "at most 8"),
    (dict(vocab_size=0), "vocab_size", "positive"),
    (dict(top_k=-1), "top_k", ">= 0"),
    (dict(top_k=2.5), "top_k", "int"),
    (dict(top_p=0.0), "top_p", r"\(0, 1\]"),
    (dict(top_p=1.5), "top_p", r"\(0, 1\]"),
    (dict(min_p=-0.1), "min_p", r"\[0, 1\]"),
    (dict(temperature=-1.0), "temperature", ">= 0"),
    (dict(temperature=float("inf")), "temperature", "finite"),
    (dict(temperature=torch.ones(3)), "temperature", "2 rows"),
    (dict(temperature=torch.ones(2, dtype=torch.int64)), "temperature", "floating-point"),
    (dict(top_k=torch.ones(2)), "top_k", "integer"),
    (dict(seed=1.5), "seed", "int"),
    (dict(seed=torch.zeros(2)), "seed", "integer"),
    (dict(top_k=torch.ones(2, dtype=torch.bool)), "top_k", "integer"),  # a bool is not a count
    (dict(offset=torch.ones(2, dtype=torch.bool)), "offset", "integer"),
    (dict(offset=torch.zeros(5, dtype=torch.int64)), "offset", "2 rows"),
    (dict(backend="cuda-magic"), "backend", "one of"),
]


@pytest.mark.parametrize("kw,name,expected", BAD, ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(kw, name, expected):
    with pytest.raises(ValueError, match=rf"^{name}=.*expected.*{expected}") as info:
        call(**kw)
    assert re.search(expected, str(info.value))


def test_the_limits_themselves_are_allowed():
    """Six guides, and vocab_size equal to the narrowest input, are within the limits (one more is refused
    above): the draw is that of the same call within them by other means."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-4, 5, (2, 10), generator=gen).float()  # small integers: every sum below is exact
    g = torch.randint(-4, 5, (2, 10), generator=gen).float()
    six = call(logits=logits, guides=[(g, 0.5)] * 6)
    one = call(logits=logits, guides=[(g, 3.0)])
    assert torch.equal(six.tokens, one.tokens) and six.input_logprobs.shape == (2, 7)
    assert torch.equal(call(logits=logits, vocab_size=10).tokens, call(logits=logits).tokens)


def test_seeds_and_offsets_are_read_modulo_2_to_the_64():
    """An int seed or offset is its value modulo 2**64 read as a signed int64: 2**63 is -2**63, the first int
    past int64's range (one less stays as it is)."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4))
    for big, same in ((1 << 63, -(1 << 63)), ((1 << 64) + 5, 5), ((1 << 63) - 1, (1 << 63) - 1 - (1 << 64))):
        for name in ("seed", "offset"):
            a, b = call(logits=logits, **{name: big}), call(logits=logits, **{name: same})
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprob, b.logprob), (name, big)


def test_seed_and_offset_are_required():
    with pytest.raises(TypeError):
        guided_sample(L)


def test_empty_batch():
    out = guided_sample(torch.zeros(0, 10), seed=0, offset=0)
    assert out.tokens.shape == (0,) and out.logsumexp.shape == (0, 1)


def test_flagged_rows_and_check():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")
    out = call(logits=logits)
    assert out.ok.tolist() == [True, False, False]
    assert out.tokens[1:].tolist() == [-1, -1]
    assert torch.isnan(out.logprob[1:]).all() and torch.isnan(out.input_logits[1:]).all()
    with pytest.raises(ValueError, match=r"rows \[1, 2\]"):
        out.check()
    assert call().check().ok.all()


def test_env_var_forces_the_backend(monkeypatch):
    monkeypatch.setenv("IVG_BACKEND", "reference")
    out = guided_sample(L, seed=0, offset=0)
    assert out.ok.all()
    monkeypatch.setenv("IVG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="IVG_BACKEND='nonsense'"):
        guided_sample(L, seed=0, offset=0)


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the CPU tensors here would be a different error path")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'"):
        guided_sample(L, seed=0, offset=0, backend="triton")


def test_triton_backend_rejects_float64():
    with pytest.raises(ValueError, match="float64"):
        guided_sample(L.double().to(DEVICE), seed=0, offset=0, backend="triton")


def test_auto_on_cpu_is_the_reference_without_triton_import(monkeypatch):
    from ivg_kernels._backend import resolve_backend

    monkeypatch.delenv("IVG_BACKEND", raising=False)
    assert resolve_backend("auto", torch.zeros(1)) == "reference"


@requires_triton
def test_op_is_registered_with_torch_library():
    from ivg_kernels._triton import sampling_kernels  # noqa: F401

    assert hasattr(torch.ops.ivg_kernels, "guided_sample")


def test_package_imports_without_triton_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['transformers'] = None\n"
        "import ivg_kernels, torch\n"
        "out = ivg_kernels.guided_sample(torch.zeros(1, 5), seed=0, offset=0)\n"
        "assert out.ok.all(); print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr

"""The random stream: Philox4x32-10 against the published known-answer vectors, uniforms, and Triton parity."""
import pytest
import torch

from ivg_kernels.reference.philox import (_philox4x32_ints, _philox4x32_numpy, _philox4x32_torch, gumbel_noise,
                                         philox4x32, philox_uniform)

from .helpers import DEVICE, requires_triton

try:
    import triton
    import triton.language as tl

    from ivg_kernels._triton.sampling_kernels import _gumbel_at, _gumbel_tile

    @triton.jit
    def _noise_kernel(out_tile, out_at, ids, seed, offset, START: tl.constexpr, BLOCK: tl.constexpr):
        seed = seed.to(tl.int64)
        offset = offset.to(tl.int64)
        tl.store(out_tile + tl.arange(0, BLOCK), _gumbel_tile(seed, offset, START, BLOCK))
        idx = tl.load(ids + tl.arange(0, BLOCK))
        tl.store(out_at + tl.arange(0, BLOCK), _gumbel_at(seed, offset, idx))

except ImportError:  # the parity test is skipped
    pass


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize(
    "ctr,key,expected",
    [
        # Random123's kat_vectors for philox4x32_10.
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    out = philox4x32(*[_t(c) for c in ctr], *[_t(k) for k in key])
    assert tuple(int(w) for w in out) == expected


def _philox_python(ctr, key, rounds=10):
    """Philox4x32 on Python ints, written from Salmon et al.'s definition (an oracle independent of
    the tensor code)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(rounds):
        pb, pa = c2 * 0xCD9E8D57, c0 * 0xD2511F53
        c0, c1, c2, c3 = (pb >> 32) ^ c1 ^ k0, pb & 0xFFFFFFFF, (pa >> 32) ^ c3 ^ k1, pa & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("path", ["public", "torch-int64", "numpy-uint64", "python-ints"])
def test_philox_matches_an_integer_oracle_on_broadcast_tensors(path):
    """Random counters and keys, with the broadcasting the samplers use (per-row keys, per-token counters).
    CPU tensors take the numpy rounds (a few calls: Python's integers); "torch-int64" runs the rounds
    every other device takes."""
    gen = torch.Generator().manual_seed(11)
    words = lambda *shape: torch.randint(0, 1 << 32, shape, generator=gen, dtype=torch.int64)  # noqa: E731
    c0, c1, c2, c3 = words(1, 37), words(5, 1), words(5, 1), words(5, 37)
    k0, k1 = words(5, 1), words(5, 1)
    if path == "public":
        out = philox4x32(c0, c1, c2, c3, k0, k1)
    else:
        rounds = {"torch-int64": _philox4x32_torch, "numpy-uint64": _philox4x32_numpy, "python-ints": _philox4x32_ints}
        out = rounds[path](*torch.broadcast_tensors(c0, c1, c2, c3, k0, k1), 10)
    for r in range(5):
        for j in range(37):
            want = _philox_python((int(c0[0, j]), int(c1[r, 0]), int(c2[r, 0]), int(c3[r, j])),
                                  (int(k0[r, 0]), int(k1[r, 0])))
            assert tuple(int(w[r, j]) for w in out) == want, (r, j)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_philox_call_splits_signed_keys_and_offsets_like_the_oracle(rows):
    """philox_call's key and counter words from int64 seeds and offsets (negative ones read as uint64,
    offsets past 2**32): up to 8 calls on the CPU on Python's integers, more through the tensor rounds."""
    from ivg_kernels.reference.philox import philox_call

    gen = torch.Generator().manual_seed(rows)
    seed = torch.randint(-(1 << 62), 1 << 62, (rows,), generator=gen)
    offset = torch.randint(-(1 << 62), 1 << 62, (rows,), generator=gen)
    seed[0], offset[0] = -1, (1 << 40) + 7
    c0 = torch.randint(0, 1 << 31, (rows,), generator=gen)
    out = philox_call(seed, offset, c0)
    assert all(w.shape == (rows,) and w.dtype == torch.int64 for w in out)
    for r in range(rows):
        s, o = int(seed[r]) % (1 << 64), int(offset[r]) % (1 << 64)
        want = _philox_python((int(c0[r]), o & 0xFFFFFFFF, o >> 32, 0), (s & 0xFFFFFFFF, s >> 32))
        assert tuple(int(w[r]) for w in out) == want, r
    one = philox_call(torch.tensor(5), torch.tensor(9), 3)  # scalars stay scalars
    assert all(w.shape == () for w in one) and tuple(int(w) for w in one) == _philox_python((3, 9, 0, 0), (5, 0))


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_draw_and_speculative_uniforms_equal_their_words_formulas(rows):
    """The sampler's two draw uniforms and speculative decoding's three per position, made in Python from the
    words of up to 8 calls on the CPU and from tensors beyond: each equals its formula applied to the words of
    the tensor rounds (``philox4x32``), over the whole int64 range of seeds and offsets."""
    from ivg_kernels.reference import philox
    from ivg_kernels.reference.sampling import DRAW_COUNTER, draw_uniforms
    from ivg_kernels.reference.speculative import SPEC_COLUMN, spec_uniforms

    gen = torch.Generator().manual_seed(100 + rows)
    seed = torch.randint(-(1 << 63), (1 << 63) - 1, (rows,), generator=gen)
    offset = torch.randint(-(1 << 63), (1 << 63) - 1, (rows,), generator=gen)
    m = philox._MASK32

    def tensor_words(c0, s, o):
        return philox.philox4x32(c0, o & m, (o >> 32) & m, 0, s & m, (s >> 32) & m)

    w0, w1, w2, w3 = tensor_words(DRAW_COUNTER, seed, offset)
    u1, u2 = draw_uniforms(seed, offset)
    assert torch.equal(u1, ((w0 << 21) | (w1 >> 11)).double() * 2.0 ** -53)
    assert torch.equal(u2, ((w2 << 21) | (w3 >> 11)).double() * 2.0 ** -53)
    positions = offset[:1].unsqueeze(1) + torch.arange(rows)  # one row's positions: [1, rows]
    words = tensor_words(SPEC_COLUMN >> 2, seed[:1].expand(rows), positions[0])[:3]
    want = philox.word_uniform(torch.stack(words, dim=-1)).double().view(1, rows, 3)
    assert torch.equal(spec_uniforms(seed[:1], positions), want)


def test_a_vocabulary_range_and_scattered_ids_give_the_same_words():
    """The one-call-per-4-tokens path (a range from a multiple of 4, on the CPU) and the per-token path
    (any ids; the only one on a GPU) read the same words."""
    from ivg_kernels.reference.philox import philox_words

    seed, offset = torch.tensor([5, -9]), torch.tensor([3, 1 << 40])
    ids = torch.arange(8, 8 + 37)
    rng = philox_words(seed, offset, ids)  # [2, 37]
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    scattered = philox_words(seed, offset, ids[perm].expand(2, -1).contiguous())
    assert torch.equal(scattered, rng[:, perm])


def test_uniform_is_open_interval_and_roughly_uniform():
    seed = torch.arange(4)
    u = philox_uniform(seed, seed * 7, torch.arange(50_000))
    assert u.dtype == torch.float32
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005


def test_stream_depends_on_every_key_part():
    ids = torch.arange(64)
    base = philox_uniform(_t(1), _t(2), ids)
    assert not torch.equal(base, philox_uniform(_t(3), _t(2), ids))
    assert not torch.equal(base, philox_uniform(_t(1), _t(5), ids))
    assert not torch.equal(base, philox_uniform(_t(1 + (1 << 40)), _t(2), ids)), "seed high word unused"
    assert not torch.equal(base, philox_uniform(_t(1), _t(2 + (1 << 40)), ids)), "offset high word unused"
    assert len(set(base.flatten().tolist())) == 64


@requires_triton
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 678), (-1, (1 << 40) + 3), ((1 << 62) + 11, -5)])
def test_triton_stream_matches_reference(seed, offset):
    block, start = 64, 128
    ids = torch.randint(0, 1 << 20, (block,), dtype=torch.int64)
    tile, at = torch.empty(block, device=DEVICE), torch.empty(block, device=DEVICE)
    _noise_kernel[(1,)](tile, at, ids.to(DEVICE), seed, offset, START=start, BLOCK=block)
    s, o = torch.tensor([seed], dtype=torch.int64), torch.tensor([offset], dtype=torch.int64)
    expect_tile = gumbel_noise(s, o, torch.arange(start, start + block))[0]
    torch.testing.assert_close(tile.cpu(), expect_tile, rtol=0, atol=2e-6)
    torch.testing.assert_close(at.cpu(), gumbel_noise(s, o, ids)[0], rtol=0, atol=2e-6)

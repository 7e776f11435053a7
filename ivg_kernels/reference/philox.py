"""The random stream of every sampler in the library, written down in plain torch.

Each draw is a pure function of ``(seed, offset, token_id)``; no generator state
lives anywhere, so a CUDA graph can replay a step by changing the seed/offset
tensors, and every backend draws the same token for the same key.

The stream is Philox4x32-10 (Salmon et al., SC'11), the generator of cuRAND and
of ``tl.randint``:

* key     ``(k0, k1) = (seed mod 2**32, (seed >> 32) mod 2**32)``, ``seed`` an int64
  read as its two's-complement uint64;
* counter ``(c0, c1, c2, c3) = (token_id >> 2, offset mod 2**32,
  (offset >> 32) mod 2**32, 0)``;
* one Philox call gives four 32-bit words; token ``v`` takes word ``v & 3``, so four
  neighbouring tokens share one call;
* the word ``w`` becomes a uniform in the open interval (0, 1), exactly
  representable in float32: ``u = (2 * (w >> 9) + 1) * 2**-24``;
* the Gumbel noise is ``g = -log(-log(u))`` in float32, with the IEEE-only ``plog`` of
  :mod:`ivg_kernels.reference.portable` in place of ``log``, so every backend gets the same bits.

Torch has no uint32 arithmetic, so this reference works in int64: the 32x32-bit product wraps
modulo 2**64 in int64 (two's complement, as torch's integer kernels do), and its high and low words
are read back with an arithmetic shift and a mask. The known-answer tests of Random123 and the
Triton parity test (true uint32 ``umulhi``) check it on every platform the tests run on.
"""
from __future__ import annotations

import numpy as np
import torch

from .dtypes import as_dtype
from .portable import gumbel_from_uniform

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting). A round is

        hi_b, lo_b = mulhilo(c2, ROUND_B);  hi_a, lo_a = mulhilo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0,  lo_b,  hi_a ^ c3 ^ k1,  lo_a
        k0, k1 = k0 + KEY_A, k1 + KEY_B  (mod 2**32)

    with ``mulhilo`` the high and low 32-bit words of the 64-bit product. Both products of a round are
    taken in one multiply of the pair ``(c2, c0)`` by ``(ROUND_B, ROUND_A)``, and the round keys come
    from one precomputed table: the same words in a third of the tensor operations.
    """
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(*_on_one_device(c0, c1, c2, c3, k0, k1))
    if c0.device.type == "cpu":
        if c0.numel() <= HOST_CALLS:
            return _philox4x32_ints(c0, c1, c2, c3, k0, k1, rounds)
        return _philox4x32_numpy(c0, c1, c2, c3, k0, k1, rounds)
    return _philox4x32_torch(c0, c1, c2, c3, k0, k1, rounds)


def _on_one_device(*args) -> list:
    """The arguments (Python integers or int64 tensors) as int64 tensors on the device of the first tensor
    that is not on the CPU (else the CPU). Integers and 0-dim CPU tensors are filled in there, not copied:
    on a GPU a copy from pageable host memory would wait for the stream, and would break a graph capture."""
    dev = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"), torch.device("cpu"))
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and (a.device == dev or a.dim() > 0):
            out.append(a.to(device=dev, dtype=torch.int64))
        else:
            out.append(torch.full((), int(a), dtype=torch.int64, device=dev))
    return out


HOST_CALLS = 8  # calls per tensor up to which Python's integers beat numpy's per-operation cost (a row's draw: 1)


def _philox4x32_ints(c0, c1, c2, c3, k0, k1, rounds):
    """The same rounds on Python integers, call by call, for a few calls (CPU tensors)."""
    calls = torch.stack([c0, c1, c2, c3, k0, k1]).reshape(6, -1).tolist()  # one read of all six
    return _words([_rounds(*call, rounds) for call in zip(*calls)], c0.shape)


def _rounds(x0, x1, x2, x3, y0, y1, rounds=PHILOX_ROUNDS):
    """One Philox call on Python integers (uint32 values): its four words."""
    for _ in range(rounds):
        pb, pa = x2 * PHILOX_ROUND_B, x0 * PHILOX_ROUND_A
        x0, x1, x2, x3 = (pb >> 32) ^ x1 ^ y0, pb & _MASK32, (pa >> 32) ^ x3 ^ y1, pa & _MASK32
        y0, y1 = (y0 + PHILOX_KEY_A) & _MASK32, (y1 + PHILOX_KEY_B) & _MASK32
    return x0, x1, x2, x3


def _words(calls: list, shape) -> tuple:
    """The four words of each call (a list of 4-tuples) as four int64 tensors of ``shape``, made in one copy."""
    return tuple(torch.tensor(calls, dtype=torch.int64).reshape(-1, 4).T.reshape(4, *shape).unbind(0))


def _philox4x32_torch(c0, c1, c2, c3, k0, k1, rounds):
    """The rounds in torch's int64 (any device), on broadcast int64 tensors."""
    dev = c0.device
    # The constants are filled in place, not copied from the host: on a GPU a copy from pageable host
    # memory would wait for the stream (a speculative round draws its uniforms here).
    mult = torch.empty((2,) + (1,) * c0.dim(), dtype=torch.int64, device=dev)
    mult[0].fill_(PHILOX_ROUND_B)
    mult[1].fill_(PHILOX_ROUND_A)
    r = torch.arange(rounds, dtype=torch.int64, device=dev).view(-1, *[1] * c0.dim())
    keys = torch.stack([(k0 + r * PHILOX_KEY_A) & _MASK32, (k1 + r * PHILOX_KEY_B) & _MASK32], dim=1)  # [rounds, 2, ...]
    x = torch.stack([c2, c0])  # the words multiplied
    y = torch.stack([c1, c3])  # the words xored in
    for i in range(rounds):
        p = x * mult  # the unsigned 64-bit products, wrapped into int64
        hi = (p >> 32) & _MASK32
        y, x = p & _MASK32, (hi ^ y ^ keys[i]).flip(0)  # (lo_b, lo_a) = (c1, c3); (c2, c0) from the new (c0, c2)
    return x[1], y[0], x[0], y[1]


def _philox4x32_numpy(c0, c1, c2, c3, k0, k1, rounds):
    """The same rounds in numpy's uint64 on CPU tensors (wrapping products, logical shifts), both products of a
    round in one multiply as in :func:`_philox4x32_torch`: the same words with a fraction of torch's
    per-operation cost, which dominates for the few words of a step."""
    c0, c1, c2, c3, k0, k1 = (t.numpy().astype(np.uint64) for t in (c0, c1, c2, c3, k0, k1))
    m32, sh = np.uint64(_MASK32), np.uint64(32)
    mult = np.array([PHILOX_ROUND_B, PHILOX_ROUND_A], dtype=np.uint64).reshape((2,) + (1,) * c0.ndim)
    step = np.array([PHILOX_KEY_A, PHILOX_KEY_B], dtype=np.uint64).reshape((2,) + (1,) * c0.ndim)
    keys = np.stack([k0, k1])
    x = np.stack([c2, c0])  # the words multiplied
    y = np.stack([c1, c3])  # the words xored in
    for _ in range(rounds):
        p = x * mult  # < 2**64: exact
        y, x = p & m32, ((p >> sh) ^ y ^ keys)[::-1]  # (lo_b, lo_a) = (c1, c3); (c2, c0) from the new (c0, c2)
        keys = (keys + step) & m32
    return tuple(torch.from_numpy(np.ascontiguousarray(w).astype(np.int64)) for w in (x[1], y[0], x[0], y[1]))


def philox_words(seed: torch.Tensor, offset: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The 32-bit Philox word of every (row, token), int64 ``[N, M]``.

    Parameters
    ----------
    seed, offset : int64 tensors of shape ``[N]``
    token_ids : int64 tensor of shape ``[N, M]`` or ``[M]`` (token ids, >= 0)
    """
    seed = seed.to(torch.int64).reshape(-1, 1)
    offset = offset.to(torch.int64).reshape(-1, 1)
    token_ids = token_ids.to(torch.int64)
    if token_ids.dim() == 1:
        token_ids = token_ids.unsqueeze(0)
    m = token_ids.shape[1]
    # One Philox call per 4 tokens when the ids are a range from a multiple of 4 (a row's vocabulary),
    # checked on the CPU only: on a GPU the check would wait for the device, and the other path gives
    # the same words.
    contiguous_range = token_ids.device.type == "cpu" and token_ids.shape[0] == 1 and m > 0 and bool(
        (token_ids[0, 0] % 4 == 0) and torch.equal(token_ids[0], token_ids[0, 0] + torch.arange(m, device=token_ids.device))
    )
    if contiguous_range:  # one Philox call per 4 consecutive tokens
        c0 = (token_ids[:, 0:1] >> 2) + torch.arange((m + 3) // 4, device=token_ids.device)  # [1, ceil(M/4)]
        return torch.stack(philox_call(seed, offset, c0), dim=-1).flatten(-2)[:, :m]  # token 4i+j takes word j
    words = torch.stack(philox_call(seed, offset, token_ids >> 2), dim=-1)  # [N, M, 4]
    lane = (token_ids & 3).expand(words.shape[:-1])
    return words.gather(-1, lane.unsqueeze(-1)).squeeze(-1)


def philox_call(seed: torch.Tensor, offset: torch.Tensor, c0) -> tuple:
    """The four words (int64 tensors) of the Philox call at counter ``(c0, offset mod 2**32,
    (offset >> 32) mod 2**32, 0)`` with key ``seed``, all three broadcast together: every draw's stream."""
    host = philox_calls_on_host(seed, offset, c0)
    if host is not None:
        return _words(*host)
    seed, offset = seed.to(torch.int64), offset.to(torch.int64)
    return philox4x32(c0, offset & _MASK32, (offset >> 32) & _MASK32, 0, seed & _MASK32, (seed >> 32) & _MASK32)


def philox_calls_on_host(seed: torch.Tensor, offset: torch.Tensor, c0):
    """:func:`philox_call` for a few calls on CPU tensors, as Python integers: ``(calls, shape)``, each call's
    four words (a list of 4-tuples in the broadcast arguments' order) and that shape; None for more calls
    or tensors elsewhere. For the few rows of a step this beats any tensor path (which costs per operation)."""
    if seed.device.type != "cpu" or offset.device.type != "cpu" or (isinstance(c0, torch.Tensor)
                                                                    and c0.device.type != "cpu"):
        return None
    calls = torch.broadcast_tensors(as_dtype(seed, torch.int64), as_dtype(offset, torch.int64),
                                    torch.as_tensor(c0, dtype=torch.int64))
    if calls[0].numel() > HOST_CALLS:
        return None
    return philox_on_host(*torch.stack(calls).reshape(3, -1).tolist()), calls[0].shape  # (int64s as Python ints)


def philox_on_host(seeds: list, offsets: list, c0s: list) -> list:
    """:func:`philox_call`'s words, one 4-tuple per call, of the int64 ``seeds``, ``offsets`` and counter words
    ``c0s`` (lists of Python integers), in Python: for a few calls."""
    return [_rounds(c, o & _MASK32, (o >> 32) & _MASK32, 0, k & _MASK32, (k >> 32) & _MASK32)
            for k, o, c in zip(seeds, offsets, c0s)]


def word_uniform(words: torch.Tensor) -> torch.Tensor:
    """Uniforms ``(2 * (w >> 9) + 1) * 2**-24`` in (0, 1), float32, of int64 Philox words ``w``."""
    return ((words >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniforms of :func:`word_uniform`, float32 ``[N, M]`` (arguments: :func:`philox_words`)."""
    return word_uniform(philox_words(seed, offset, token_ids))


def gumbel_noise(seed: torch.Tensor, offset: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``-plog(-plog(u))`` in float32, ``[N, M]``.

    ``u`` takes 2**23 values, so the noise is looked up in a table of ``gumbel_from_uniform`` over all of
    them (32 MB per device, built on first use): the same bits as computing it, 5x faster on a CPU.
    """
    index = philox_words(seed, offset, token_ids) >> 9
    return gumbel_table(index.device).index_select(0, index.flatten()).view(index.shape)


_TABLES: dict = {}


def gumbel_table(device) -> torch.Tensor:
    """``gumbel_from_uniform`` at every uniform of the stream, float32 ``[2**23]``, indexed by ``w >> 9``."""
    key = str(torch.device(device))
    if key not in _TABLES:
        u = (torch.arange(1 << 23, dtype=torch.int64, device=device) * 2 + 1).to(torch.float32) * (2.0 ** -24)
        _TABLES[key] = torch.cat([gumbel_from_uniform(chunk) for chunk in u.split(1 << 20)])
    return _TABLES[key]

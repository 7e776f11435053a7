"""The two transcendentals a draw depends on, built from IEEE operations only.

A token is a function of float32 values compared against each other, so "the same key gives
the same token on every backend" needs every operation on the way to be the same on every
backend. Division, addition and multiplication are correctly rounded everywhere (the kernels
use ``div_rn`` and launch without fused multiply-add); ``log`` and ``exp`` are not, since each
library rounds them its own way. These two are therefore written down here from integer and
correctly rounded float32 operations, in a fixed order, and the Triton kernels compute them
with the same operations (``_triton/sampling_kernels.py``: ``_plog``, ``_mass_int``):

* :func:`plog` -- ``log(x)`` for positive normal float32 ``x`` (about 2 ulp): the Gumbel noise
  ``-plog(-plog(u))`` and the min-p threshold ``max x + plog(min_p)``;
* :func:`mass_int` -- ``exp(d)`` for ``d <= 0`` as an integer in units of ``2**-40``: the
  masses that the top-p threshold and the unfiltered draw sum. Integers add exactly in any
  order, so neither depends on how a backend splits the row.

Every function takes and returns torch tensors and is meant to be read beside its kernel
twins: each line here is one operation there (``mass_int_numpy``: the same operations in numpy, for the
CPU's small draws).
"""
from __future__ import annotations

import numpy as np
import torch

SQRT2 = 1.41421353816986083984375  # float32 just below sqrt(2)
LN2_HI = 0.693145751953125  # ln 2 rounded to 16 bits: e * LN2_HI is exact for |e| < 256
LN2_LO = 1.428606765330187045e-06  # ln 2 - LN2_HI, rounded to float32
# log(1 + f) = 2 atanh(s), s = f / (2 + f): 2s + s * (z * (L1 + z * (L2 + z * (L3 + z * L4)))), z = s^2
LOG_L1 = 0.666666686534881591796875  # 2/3
LOG_L2 = 0.4000000059604644775390625  # 2/5
LOG_L3 = 0.2857142984867095947265625  # 2/7
LOG_L4 = 0.2222222238779067993164062  # 2/9
LOG2E = 1.44269502162933349609375  # float32(1 / ln 2)
# 2^r on [0, 1): a degree-6 polynomial 1 + c1 r + ... + c6 r^6 fitted for relative error (Lawson's
# iteration on Chebyshev nodes), coefficients rounded to float32; evaluated in float32 by Horner's rule its
# relative error is below 1e-7 on [0, 1), as good as float32 allows, in 12 operations.
EXP2_C = (
    0.6931470632553101,
    0.2402293086051941,
    0.055485282093286514,
    0.009675451554358006,
    0.001246784464456141,
    0.0002161292068194598,
)
MASS_BITS = 40  # mass_int(0) == 2**40
FLT_MIN = 1.1754943508222875e-38  # the smallest normal float32: plog's arguments are clamped to it

_F32 = torch.float32


def _f(x: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x, dtype=_F32, device=like.device)


def plog(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` of positive normal float32 values, from IEEE operations only (float32 out)."""
    x = x.to(_F32)
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127  # int32 exponent
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(_F32)  # [1, 2)
    big = m > _f(SQRT2, m)
    m = torch.where(big, m * _f(0.5, m), m)  # (sqrt(1/2), sqrt(2)], exact
    e = torch.where(big, e + 1, e)
    f = m - _f(1.0, m)  # exact
    s = f / (_f(2.0, m) + f)
    z = s * s
    r = z * (_f(LOG_L1, z) + z * (_f(LOG_L2, z) + z * (_f(LOG_L3, z) + z * _f(LOG_L4, z))))
    ef = e.to(_F32)
    return ef * _f(LN2_HI, ef) + (ef * _f(LN2_LO, ef) + (s + s + s * r))


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """The Gumbel noise ``-plog(-plog(u))`` of uniforms in (0, 1), float32."""
    return -plog(-plog(u))


def mass_int(d: torch.Tensor) -> torch.Tensor:
    """``round_down(exp(d) * 2**40)`` for float32 ``d <= 0`` (``x - max x``), as int64.

    ``t = d * LOG2E``; ``n = floor(t)``; ``r = t - n`` (exact); ``q = 2^r`` by the degree-6
    polynomial ``EXP2_C`` in Horner form; the mass is ``floor(q * 2**(n + 40))``: scaling by a
    power of two is exact, so this is ``q``'s 24 bits shifted by ``n + 17``, rounded down.
    ``d = -inf`` (or anything below about -29) gives 0; ``d = 0`` gives ``2**40``.
    """
    d = d.to(_F32)
    t = d * LOG2E  # a Python float meets a float32 tensor as float32: the same operations as _f constants
    # fmax(t, -64): every mass below is 0, NaN becomes -64 too (torch.fmax, the same values, is about ten
    # times slower on the CPU)
    t.nan_to_num_(nan=-64.0, posinf=float("inf"), neginf=-64.0).clamp_(min=-64.0)
    n = torch.floor(t)
    r = t.sub_(n)  # (in place: the same operations, fewer temporaries)
    q = r * EXP2_C[5]
    for c in EXP2_C[4::-1]:  # Horner: q = (c + q) * r, innermost first
        q.add_(c).mul_(r)
    q.add_(1.0)
    scale = n.to(torch.int32).add_(MASS_BITS + 127).bitwise_left_shift_(23).view(_F32)  # 2**(n + 40), n + 40 >= -24
    return q.mul_(scale).floor_().to(torch.int64)


def mass_int_numpy(d: np.ndarray) -> np.ndarray:
    """:func:`mass_int` in numpy, the same operations on float32 (for the CPU's small draws, where each torch
    operation costs several times numpy's): int64, equal bit for bit (tested)."""
    f32 = np.float32
    with np.errstate(invalid="ignore", over="ignore"):  # (+inf lies outside the domain: no warning, as in torch)
        t = d.astype(f32) * f32(LOG2E)
        t = np.fmax(t, f32(-64.0))  # NaN and everything below -64 become -64, as mass_int's nan_to_num and clamp
        n = np.floor(t)
        r = t - n
        q = r * f32(EXP2_C[5])
        for c in EXP2_C[4::-1]:
            q += f32(c)
            q *= r
        q += f32(1.0)
        q *= ((n.astype(np.int32) + np.int32(MASS_BITS + 127)) << np.int32(23)).view(f32)  # 2**(n + 40)
        return np.floor(q, out=q).astype(np.int64)


def nucleus_target(top_p: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The integer mass the top-p nucleus must reach: ``ceil(p * total * (1 - 2**-20))`` in float64.

    ``p`` is ``top_p`` rounded to float32; ``total`` the int64 mass of the candidates. The factor
    ``1 - 2**-20`` makes a nucleus that reaches ``p`` in exact arithmetic count as reached
    despite the rounding of ``p`` and of the masses (``log([0.3, 0.1, 0.1, 0.5])`` with
    ``top_p=0.8`` keeps two tokens, as Hugging Face's warper does).
    """
    p = top_p.to(_F32).to(torch.float64)
    want = (p * total.to(torch.float64)) * (1.0 - 2.0 ** -20)
    return torch.ceil(want).to(torch.int64).clamp(min=1)

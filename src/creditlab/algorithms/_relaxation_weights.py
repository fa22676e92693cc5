"""The relaxation weights of Activation Relaxation, shared by the MLP ``ar`` and graph AR.

With the Jacobians held at their forward values one Euler step is x <- M x + eta b, M =
(1-eta) I + eta N (synchronous) or (1-eta)(I - eta N)^{-1} (sweep), N nilpotent; so
M^T = sum_k w_k N^k with binomial (synchronous) or negative-binomial (sweep) weights w_k, and
a state m hops below the clamp reaches 1 - sum_{k<=m} w_k of its equilibrium from zero.
"""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=256)
def relaxation_weights(steps: int, eta: float, schedule: str, kmax: int) -> tuple[float, ...]:
    """w_k, k = 0..kmax, of M^T = sum_k w_k N^k (see the module docstring)."""
    out = []
    for k in range(kmax + 1):
        if schedule == "synchronous":
            if k > steps:
                out.append(0.0)
                continue
            out.append(_binom_term(math.comb(steps, k), 1.0 - eta, steps - k, eta, k))
        else:
            if steps == 0:
                out.append(1.0 if k == 0 else 0.0)
                continue
            out.append(_binom_term(math.comb(steps + k - 1, k), 1.0 - eta, steps, eta, k))
    return tuple(out)


def _binom_term(comb: int, q: float, qexp: int, p: float, pexp: int) -> float:
    """comb * q**qexp * p**pexp without overflow (q may be 0 or negative, p > 0)."""
    if qexp and q == 0.0:
        return 0.0
    try:
        val = float(comb) * q**qexp * p**pexp
    except OverflowError:  # comb beyond float range
        val = 0.0
    if val != 0.0 or comb == 0:
        return val
    # a huge binomial against a power that underflowed: combine in log space
    sign = -1.0 if (q < 0 and qexp % 2) else 1.0
    logv = math.log(comb) + (qexp * math.log(abs(q)) if qexp else 0.0) + (pexp * math.log(p) if pexp else 0.0)
    return sign * math.exp(logv) if logv > -745 else 0.0


@functools.lru_cache(maxsize=64)
def weights(steps: int, eta: float, schedule: str, kmax: int) -> tuple[float, ...]:
    return tuple(relaxation_weights(steps, eta, schedule, kmax))


@functools.lru_cache(maxsize=64)
def tail_weights(steps: int, eta: float, schedule: str, mmax: int) -> tuple[float, ...]:
    """1 - sum_{k<=m} w_k for m = 0..mmax, without the cancellation of 1 - (sum close to 1):
    for 0 < eta <= 1 (weights of one sign summing to 1), where the partial sum exceeds 1/2 the
    tail sum_{k>m} w_k is summed directly (the binomial weights end at k = steps; the
    negative-binomial ones are summed until negligible). For 1 < eta < 2 the synchronous weights
    alternate in sign and grow to (2 eta - 1)^steps, and the negative-binomial series diverges:
    a directly summed tail would be the rounding of huge terms (or never end), so the tail is
    1 - the exactly rounded partial sum, whose terms are no larger than itself."""
    w = relaxation_weights(steps, eta, schedule, mmax)
    if eta > 1.0:  # (the binomial weights end at k = steps: the tails past it are exactly 0)
        return tuple(0.0 if schedule == "synchronous" and m >= steps else 1.0 - math.fsum(w[: m + 1])
                     for m in range(mmax + 1))
    out: list[float] = []
    cum = 0.0
    for m in range(mmax + 1):
        cum += w[m]
        if cum <= 0.5:
            out.append(1.0 - cum)
            continue
        if schedule == "synchronous":
            ws = relaxation_weights(steps, eta, schedule, steps) if steps > m else []
            out.append(math.fsum(ws[m + 1:]))
        else:
            terms: list[float] = []
            k, n = m + 1, max(steps, 1)
            while True:
                t = relaxation_weights(steps, eta, schedule, k)[k] if k < 64 else _negbin(steps, eta, k)
                terms.append(t)
                if (k > m + 8 and t <= 1e-30 * max(math.fsum(terms), 1e-300)) or k > m + 100000 + 10 * n:
                    break
                k += 1
            out.append(math.fsum(terms))
    return tuple(out)


def _negbin(steps: int, eta: float, k: int) -> float:
    if steps == 0:
        return 0.0
    return math.exp(math.lgamma(steps + k) - math.lgamma(k + 1) - math.lgamma(steps)
                    + steps * math.log1p(-eta) + k * math.log(eta)) if eta < 1 else 0.0

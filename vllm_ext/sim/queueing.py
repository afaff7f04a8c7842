"""Closed forms for one server (M/G/1), to validate the simulator against.

* FCFS, Pollaczek-Khinchine: E[T] = E[S] + lambda E[S^2] / (2 (1 - rho)).
* Preemptive SRPT (Schrage & Miller 1966), for a job of size x:
      E[T(x)] = lambda (int_0^x t^2 dF(t) + x^2 (1 - F(x))) / (2 (1 - rho(x))^2)
                + int_0^x dt / (1 - rho(t)),      rho(x) = lambda int_0^x t dF(t),
  averaged over the size distribution. Sizes here are discrete (token counts x step time), so
  the integrals are sums over atoms and the residence integral is piecewise constant. With
  atoms, ties are served FCFS: the work ahead includes earlier jobs of the same size (load
  rho(<=x)) but only strictly smaller arrivals preempt (load rho(<x)), so the waiting term's
  denominator is 2 (1 - rho(<=x)) (1 - rho(<x)); for continuous F both equal rho(x). One size
  only gives back M/D/1 FCFS.
"""
from __future__ import annotations

import numpy as np


def _dist(sizes: np.ndarray, probs: np.ndarray | None):
    sizes = np.asarray(sizes, dtype=float)
    probs = np.full(sizes.size, 1.0 / sizes.size) if probs is None else np.asarray(probs, float)
    order = np.argsort(sizes)
    return sizes[order], probs[order] / probs.sum()


def mg1_fcfs_mean_response(lam: float, sizes, probs=None) -> float:
    s, p = _dist(sizes, probs)
    es, es2 = float(p @ s), float(p @ s**2)
    rho = lam * es
    if rho >= 1:
        raise ValueError(f"unstable: rho = {rho:.3f} >= 1")
    return es + lam * es2 / (2 * (1 - rho))


def mg1_srpt_mean_response(lam: float, sizes, probs=None) -> float:
    s, p = _dist(sizes, probs)
    if lam * float(p @ s) >= 1:
        raise ValueError("unstable: rho >= 1")
    uniq = np.unique(s)
    p_u = np.array([p[s == u].sum() for u in uniq])
    rho_le = lam * np.cumsum(p_u * uniq)            # rho(x) at each atom, sizes <= x
    m2_le = np.cumsum(p_u * uniq**2)
    tail = 1.0 - np.cumsum(p_u)                     # P(S > x)
    total = 0.0
    for k, x in enumerate(uniq):
        rho_lt = rho_le[k - 1] if k else 0.0
        waiting = lam * (m2_le[k] + x * x * tail[k]) / (2 * (1 - rho_le[k]) * (1 - rho_lt))
        # residence: while remaining is in (uniq[j-1], uniq[j]] only jobs smaller than
        # the remaining time (sizes <= uniq[j-1]) preempt
        edges = np.concatenate([[0.0], uniq[: k + 1]])
        rho_before = np.concatenate([[0.0], rho_le[:k]])
        residence = float(np.sum(np.diff(edges) / (1 - rho_before)))
        total += p_u[k] * (waiting + residence)
    return total

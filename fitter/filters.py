"""Smoothing detections over time: the One-Euro filter (Casiez, Roussel & Vogel, CHI 2012).

An exponential smoother whose cut-off frequency rises with the signal's speed: slow motion is
smoothed hard (little jitter), fast motion lightly (little lag). Pure numpy, any array shape;
each element is filtered on its own. `one_euro_two_way` runs it forward and backward over a whole
recording, for offline use: no lag at all.
"""

from __future__ import annotations

import math

import numpy as np


def smoothing_factor(dt: float, cutoff) -> np.ndarray:
    """alpha of an exponential smoother with this cut-off frequency (Hz) at time step dt (s):
    alpha = 1 / (1 + tau / dt), tau = 1 / (2 pi cutoff)."""
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, dtype=np.float64))
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """x_hat_i = a_i x_i + (1 - a_i) x_hat_(i-1), with a_i from the cut-off min_cutoff + beta |dx_hat_i|,
    where dx_hat is the signal's derivative smoothed at d_cutoff. Times in seconds (strictly increasing;
    a gap, e.g. a frame without a face, is just a longer step)."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
            raise ValueError("One-Euro filter: min_cutoff and d_cutoff must be > 0, beta >= 0")
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.x_prev: np.ndarray | None = None
        self.dx_prev: np.ndarray | None = None
        self.t_prev: float | None = None

    def __call__(self, x, t: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.x_prev is None:
            self.x_prev, self.dx_prev, self.t_prev = x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        dt = float(t) - self.t_prev
        if dt <= 0:
            raise ValueError(f"One-Euro filter: time went from {self.t_prev} to {t}; it must increase")
        dx = (x - self.x_prev) / dt
        a_d = smoothing_factor(dt, self.d_cutoff)
        dx_hat = a_d * dx + (1 - a_d) * self.dx_prev
        a = smoothing_factor(dt, self.min_cutoff + self.beta * np.abs(dx_hat))
        x_hat = a * x + (1 - a) * self.x_prev
        self.x_prev, self.dx_prev, self.t_prev = x_hat, dx_hat, float(t)
        return x_hat


def one_euro(values: np.ndarray, times: np.ndarray, min_cutoff: float = 1.0, beta: float = 0.0,
             d_cutoff: float = 1.0) -> np.ndarray:
    """Filter a sequence T x ... sampled at `times` (T, seconds) -> T x ... (float64)."""
    f = OneEuroFilter(min_cutoff, beta, d_cutoff)
    return np.stack([f(v, t) for v, t in zip(values, times, strict=True)])


def one_euro_two_way(values: np.ndarray, times: np.ndarray, min_cutoff: float = 1.0, beta: float = 0.0,
                     d_cutoff: float = 1.0) -> np.ndarray:
    """The mean of one_euro run forward in time and run backward (on the reversed sequence), for a whole
    recording known in advance. Run forward, the filter trails a moving signal; run backward, it leads it
    by as much, so the mean does neither, and it averages two smoothings of the noise."""
    times = np.asarray(times, dtype=np.float64)
    forward = one_euro(values, times, min_cutoff, beta, d_cutoff)
    backward = one_euro(values[::-1], times[-1] - times[::-1], min_cutoff, beta, d_cutoff)[::-1]
    return 0.5 * (forward + backward)

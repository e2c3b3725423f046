"""The scaling law L(N, D) = E + A / N^alpha + B / D^beta fitted to final validation losses.

Hoffmann et al. 2022 (Chinchilla), approach 3: with a = log A, b = log B, e = log E the prediction is
    log L_hat = LSE(a - alpha log N, b - beta log D, e)
and the fit minimises the Huber loss (delta 1e-3) between log L_hat and log L over the runs, with L-BFGS
(scipy.optimize, analytic gradient) from a grid of starting points, keeping the best. Confidence intervals come from
a bootstrap: the runs resampled with replacement and refitted (percentiles 2.5 and 97.5).

Compute-optimal allocation under C = 6 N D (Chinchilla's approximation of training FLOPs):
    N_opt(C) = G (C/6)^(beta/(alpha+beta)),  D_opt(C) = (C/6)^(alpha/(alpha+beta)) / G,  G = (alpha A / (beta B))^(1/(alpha+beta))
so tokens per parameter D_opt / N_opt depend on C unless alpha = beta; Chinchilla's fit gives about 20.
"""

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
# starting points of the fit: a coarser grid than Hoffmann et al.'s (108 starts, a few seconds for a few dozen runs;
# on synthetic losses most starts reach the same minimum)
START_GRID = {"a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "e": (-1.0, 0.0, 1.0), "alpha": (0.2, 0.6),
              "beta": (0.2, 0.6)}


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, parameters, tokens):
        return self.E + self.A / np.power(parameters, self.alpha) + self.B / np.power(tokens, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the loss at C = 6 N D FLOPs."""
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / total)
        return g * (flops / 6) ** (self.beta / total), (flops / 6) ** (self.alpha / total) / g

    def tokens_per_parameter(self, flops: float) -> float:
        parameters, tokens = self.optimal(flops)
        return tokens / parameters

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber loss of the log prediction over the runs, and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, runs)
    top = terms.max(axis=0)
    exp = np.exp(terms - top)  # (3, runs)
    total = exp.sum(axis=0)
    residual = top + np.log(total) - log_loss  # (runs,): log-sum-exp minus the log loss
    size = np.abs(residual)
    value = np.where(size <= HUBER_DELTA, 0.5 * residual**2, HUBER_DELTA * (size - 0.5 * HUBER_DELTA)).sum()
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # dHuber / dresidual
    weights = exp / total * slope  # (3, runs): softmax of the terms times the slope
    gradient = np.array([weights[0].sum(), weights[1].sum(), weights[2].sum(),
                         -(weights[0] * log_n).sum(), -(weights[1] * log_d).sum()])
    return float(value), gradient


def fit_law(parameters, tokens, losses, starts: list[np.ndarray] | None = None) -> Law:
    """The law that fits (N, D, L) best over the starting points (`START_GRID` unless given)."""
    log_n, log_d, log_loss = (np.log(np.asarray(x, dtype=float)) for x in (parameters, tokens, losses))
    if starts is None:
        starts = [np.array(start) for start in itertools.product(*START_GRID.values())]
    bounds = [(None, None), (None, None), (None, None), (0.0, 3.0), (0.0, 3.0)]
    best = None
    for start in starts:
        result = minimize(objective, start, args=(log_n, log_d, log_loss), jac=True, method="L-BFGS-B",
                          bounds=bounds, options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


def to_theta(law: Law) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def bootstrap(parameters, tokens, losses, law: Law, samples: int = 200, seed: int = 0) -> list[Law]:
    """Laws refitted on runs resampled with replacement, each from the full fit and a few grid starts."""
    rng = np.random.default_rng(seed)
    parameters, tokens, losses = (np.asarray(x, dtype=float) for x in (parameters, tokens, losses))
    starts = [to_theta(law), np.array([5.0, 5.0, 0.0, 0.3, 0.3])]
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, len(losses), len(losses))
        laws.append(fit_law(parameters[pick], tokens[pick], losses[pick], starts))
    return laws


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)

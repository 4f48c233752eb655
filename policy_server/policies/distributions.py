"""Pure numpy maths of action distributions. Shapes: B batch, n actions, d action dims.

Masks are bool arrays of the logits' shape, True = allowed: a masked logit is -inf, so its action
has probability exactly 0 (sb3-contrib's ``MaskableCategorical`` does the same).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr

LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)
LOG_2 = np.log(2.0)


def masked(logits: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """float64 ``(B, n)`` logits with the masked ones (``mask`` False) set to -inf."""
    logits = logits.astype(np.float64)
    return logits if mask is None else np.where(mask, logits, -np.inf)


def log_softmax(logits: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(B, n)`` logits → ``(B, n)`` log-probabilities; equals ``log(softmax(logits))``, -inf where
    ``mask`` is False (each row needs one allowed action)."""
    logits = masked(logits, mask)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_categorical(logits: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None) -> np.ndarray:
    """One action per row ``(B,)`` drawn from softmax(logits), by the Gumbel-max trick; never a
    masked one."""
    gumbel = -np.log(-np.log(rng.uniform(low=np.finfo(np.float64).tiny, high=1.0, size=logits.shape)))
    return np.argmax(masked(logits, mask) + gumbel, axis=-1)


def argmax(logits: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The most likely allowed action per row ``(B,)``."""
    return np.argmax(masked(logits, mask), axis=-1)


def gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[b, index[b]]`` for every row: ``(B, n), (B,) → (B,)``."""
    return np.take_along_axis(values, index[:, None], axis=-1)[:, 0]


def gaussian_log_prob(x: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> np.ndarray:
    """Log-density of a diagonal Gaussian, summed over the action dims: ``(B, d) → (B,)``."""
    z = (x - mean) / np.exp(log_std)
    return (-0.5 * z**2 - log_std - LOG_SQRT_2PI).sum(axis=-1)


def clipped_gaussian_log_prob(
    x: np.ndarray, mean: np.ndarray, log_std: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Log-likelihood of a clipped action ``x = clip(u, low, high)``, ``u ~ N(mean, std)``, ``(B, d) → (B,)``.

    The censored Gaussian of Fujita & Maeda 2018 ("Clipped Action Policy Gradient", eq. 4): at a
    bound the probability mass beyond it, ``log Φ((low - mean)/std)`` at ``low`` and
    ``log(1 - Φ((high - mean)/std)) = log Φ((mean - high)/std)`` at ``high`` (``log_ndtr``: stable
    far in the tails); inside, the Gaussian density. An infinite bound is never reached.
    """
    std = np.exp(log_std)
    inside = -0.5 * ((x - mean) / std) ** 2 - log_std - LOG_SQRT_2PI
    with np.errstate(invalid="ignore"):  # inf - inf at an infinite bound, never selected
        at_low = log_ndtr((low - mean) / std)
        at_high = log_ndtr((mean - high) / std)
    per_dim = np.where(x <= low, at_low, np.where(x >= high, at_high, inside))
    return per_dim.sum(axis=-1)


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """``log(sigmoid(x))`` without overflow: ``-log(1 + exp(-x))``."""
    return -np.logaddexp(0.0, -x)


def bernoulli_log_prob(bits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Independent bits with ``P(bit = 1) = sigmoid(logit)``: log-probability of 0/1 ``bits``
    ``(B, n)``, summed over the bits, ``(B,)``. ``log(1 - sigmoid(x)) = log sigmoid(-x)``."""
    logits = logits.astype(np.float64)
    return np.where(bits > 0, log_sigmoid(logits), log_sigmoid(-logits)).sum(axis=-1)


def log_one_minus_tanh_sq(u: np.ndarray) -> np.ndarray:
    """``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``, exact where the naive form underflows
    (the stable form of SAC's appendix C used by Spinning Up and SB3's ``SquashedDiagGaussian``)."""
    return 2.0 * (LOG_2 - u - np.logaddexp(0.0, -2.0 * u))


def squash(u: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``low + (tanh(u) + 1) / 2 · (high - low)``: a pre-squash value in the bounds."""
    return low + (np.tanh(u) + 1.0) * 0.5 * (high - low)


def unsquash(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The inverse of ``squash``, with ``tanh(u)`` kept inside ``±(1 - 1e-6)`` (a float32 action at
    its bound has no finite pre-image; SB3's ``TanhBijector.inverse`` clips likewise)."""
    y = np.clip(2.0 * (x - low) / (high - low) - 1.0, -1.0 + 1e-6, 1.0 - 1e-6)
    return np.arctanh(y)


def tanh_gaussian_log_prob(
    x: np.ndarray, mean: np.ndarray, log_std: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Log-density of a squashed action ``x = squash(u)``, ``u ~ N(mean, std)``: ``(B, d) → (B,)``.

    Change of variables (Haarnoja et al. 2018, SAC, appendix C): ``log N(u) - Σ log(1 - tanh(u)²)
    - Σ log((high - low) / 2)``, with ``u = unsquash(x)``.
    """
    u = unsquash(x, low, high)
    scale = np.log((high - low) / 2.0)
    return gaussian_log_prob(u, mean, log_std) - (log_one_minus_tanh_sq(u) + scale).sum(axis=-1)

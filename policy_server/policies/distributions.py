"""Pure numpy maths of action distributions. Shapes: B batch, n actions, d action dims."""

from __future__ import annotations

import numpy as np

LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``(B, n)`` logits → ``(B, n)`` log-probabilities; equals ``log(softmax(logits))``."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row ``(B,)`` drawn from softmax(logits), by the Gumbel-max trick."""
    gumbel = -np.log(-np.log(rng.uniform(low=np.finfo(np.float64).tiny, high=1.0, size=logits.shape)))
    return np.argmax(logits.astype(np.float64) + gumbel, axis=-1)


def gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[b, index[b]]`` for every row: ``(B, n), (B,) → (B,)``."""
    return np.take_along_axis(values, index[:, None], axis=-1)[:, 0]


def gaussian_log_prob(x: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> np.ndarray:
    """Log-density of a diagonal Gaussian, summed over the action dims: ``(B, d) → (B,)``."""
    z = (x - mean) / np.exp(log_std)
    return (-0.5 * z**2 - log_std - LOG_SQRT_2PI).sum(axis=-1)

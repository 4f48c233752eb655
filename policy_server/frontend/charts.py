"""Server answers → what the demo shows: action summaries and pandas frames for its charts."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def space_text(space: dict[str, Any] | None) -> str:
    """An action space of ``GET /`` (or of the schema) as a short line."""
    if not space:
        return "read off the model"
    if space["type"] == "discrete":
        names = space.get("names") or [str(i) for i in range(space["n"])]
        return f"discrete, {space['n']} actions: {', '.join(names)}"
    if space["type"] == "tuple":
        names = space.get("names") or [[str(i) for i in range(n)] for n in space["nvec"]]
        return f"tuple of {len(space['nvec'])}: " + " × ".join("{" + ", ".join(c) + "}" for c in names)
    return f"box, shape {space['shape']}, low {space['low']}, high {space['high']}"


def action_text(answer: dict[str, Any]) -> str:
    """``/predict``'s action as a line of text: its name and index, per component for a tuple."""
    action, name = answer["action"], answer.get("action_name")
    if isinstance(action, list) and name is None:  # a box: the vector
        return "[" + ", ".join(f"{a:.4g}" for a in action) + "]"
    if isinstance(action, list):
        return ", ".join(f"{n} ({a})" if str(n) != str(a) else str(a) for n, a in zip(name, action))
    return f"{name} ({action})" if name is not None and str(name) != str(action) else str(action)


def distribution_frame(distribution: dict[str, Any]) -> pd.DataFrame:
    """``/distribution``'s answer as rows for a chart.

    discrete: ``action``, ``probability``; tuple: ``component``, ``action``, ``probability``;
    box: ``dimension``, ``mean``, ``std``.
    """
    if distribution.get("probabilities") is not None:
        probs = distribution["probabilities"]
        return pd.DataFrame({"action": list(probs), "probability": list(probs.values())})
    if distribution.get("components") is not None:
        rows = [
            {"component": f"component {c}", "action": a, "probability": p}
            for c, probs in enumerate(distribution["components"])
            for a, p in probs.items()
        ]
        return pd.DataFrame(rows, columns=["component", "action", "probability"])
    if distribution.get("mean") is not None:
        mean, std = distribution["mean"], distribution["std"]
        return pd.DataFrame({"dimension": list(range(len(mean))), "mean": mean, "std": std})
    raise ValueError(f"not a distribution answer: {sorted(distribution)}")


def token_log_prob_frame(choice: dict[str, Any]) -> pd.DataFrame:
    """One chat completion choice's per-token logprobs: ``position``, ``token``, ``logprob``,
    ``probability``, and ``label`` (position and token, unique and in order, for a chart axis)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    rows = [
        {"position": i, "token": t["token"], "logprob": t["logprob"], "probability": math.exp(t["logprob"]),
         "label": f"{i:03d} {t['token']!r}"}
        for i, t in enumerate(content)
    ]
    return pd.DataFrame(rows, columns=["position", "token", "logprob", "probability", "label"])


def training_point(status: dict[str, Any], t: float) -> dict[str, Any]:
    """One poll of ``/train/status`` at ``t`` seconds, for the history chart."""
    return {
        "t": t,
        "model_version": status["model_version"],
        "updates": status["updates"],
        "episodes": status["episodes"],
        "mean_return": status["mean_return"],
        "last_return": status["last_return"],
        "samples_accepted": status["samples_accepted"],
    }


def append_point(history: list[dict[str, Any]], point: dict[str, Any], max_points: int = 600) -> list[dict[str, Any]]:
    """The history with ``point`` added (a poll that changed nothing but the time replaces the
    previous one's time), at most ``max_points`` long."""
    def values(p: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if k != "t"}

    if len(history) >= 2 and values(history[-2]) == values(history[-1]) == values(point):
        history = history[:-1]  # a flat stretch keeps its first and its latest poll
    return (history + [point])[-max_points:]


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """The polls as a frame indexed by ``t`` (seconds since the first poll)."""
    frame = pd.DataFrame(history, columns=["t", "model_version", "updates", "episodes", "mean_return",
                                           "last_return", "samples_accepted"])
    return frame.set_index("t")


def returns_frame(status: dict[str, Any]) -> pd.DataFrame:
    """The last ``return_window`` episode returns, indexed by episode number."""
    recent = status.get("recent_returns") or []
    first = status.get("episodes", len(recent)) - len(recent) + 1
    return pd.DataFrame({"episode": range(first, first + len(recent)), "return": recent}).set_index("episode")


def grpo_frame(status: dict[str, Any]) -> pd.DataFrame:
    """A GRPO run's mean reward per cycle (the group's mean reward of each training cycle)."""
    history = status.get("reward_history") or []
    return pd.DataFrame({"cycle": range(1, len(history) + 1), "mean_reward": history}).set_index("cycle")

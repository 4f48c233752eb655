"""The floor: a plain FastAPI app that runs the policy in its own process, sync endpoint.

``uvicorn --factory bench.baselines.plain_fastapi:create_app`` with ``SCHEMA_PATH`` set. No Ray,
no batching, no metrics: FastAPI runs the sync handler in its thread pool, one forward per request.
"""

from typing import Any

import numpy as np
from fastapi import Depends, FastAPI

from bench.baselines.common import load_baseline_policy


def create_app() -> FastAPI:
    base = load_baseline_policy()
    Observation = base.observation_model
    rng = np.random.default_rng()
    app = FastAPI(title="baseline: plain FastAPI")

    @app.get("/")
    def status() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict", dependencies=[Depends(base.key_checker())])
    def predict(obs: Observation) -> dict[str, Any]:  # type: ignore[valid-type]
        return base.answer(base.policy.forward(base.to_input(obs)), rng)

    return app

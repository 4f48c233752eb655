"""The GRPO routes of the LLM policy: runs that sample groups, take rewards and update a copy of the model."""


from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from policy_server.gateway.auth import Auth
from policy_server.gateway.errors import in_body
from policy_server.gateway.grpo.wire import (
    GRPOGroup,
    GRPOPrompt,
    GRPORewards,
    GRPORunList,
    GRPOStarted,
    GRPOStatus,
    GRPOUpdate,
)
from policy_server.gateway.llm.router import LLM_ERRORS
from policy_server.gateway.llm.setup import Starting
from policy_server.gateway.openapi import error_docs
from policy_server.llm.grpo_settings import GRPOSettings
from policy_server.serving.api import GRPORunsAPI


def grpo_router(service: Starting[GRPORunsAPI], auth: Auth, prefix: str) -> APIRouter:
    """grpo_server's control-flow reversal: the server hands out completions, the client scores
    them and sends the rewards back, and each reward submission is one training cycle."""
    router = APIRouter(prefix=f"{prefix}/grpo/runs", tags=["LLM GRPO"], dependencies=[Depends(auth)],
                       responses=LLM_ERRORS | error_docs({409: "Run finished, stale group, or too many runs."}))

    @router.post("", status_code=201, response_model=GRPOStarted)
    async def start(body: GRPOSettings) -> Any:
        """Start a run with these settings; answers its `run_id` and status."""
        return await in_body(service.require().start(body))

    @router.get("", response_model=GRPORunList)
    async def runs() -> Any:
        """The runs this server knows."""
        return {"runs": await service.require().list()}

    @router.post("/{run_id}/completions", response_model=GRPOGroup)
    async def completions(run_id: str, body: GRPOPrompt) -> Any:
        """A group of completions of the prompt, with their token ids and logprobs and the
        `model_version` `[run_id, cycle]` that made them."""
        return await in_body(service.require().complete(run_id, body.prompt))

    @router.post("/{run_id}/rewards", response_model=GRPOUpdate, response_model_exclude_none=True,
                 responses=error_docs({410: "The group was handed out by a process that died: ask for new completions."}))
    async def rewards(run_id: str, body: GRPORewards) -> Any:
        """The rewards of a group (scored by the client): one training cycle, on disk before this
        answers; answers the version now training, the loss and the group's mean reward. A group
        that a process of the run handed out before it died answers 410 `group_lost`."""
        return await in_body(service.require().rewards(run_id, body.group_id, body.rewards))

    @router.get("/{run_id}", response_model=GRPOStatus)
    async def status(run_id: str) -> Any:
        """Counters, cycle, mean reward and the reward history."""
        return await service.require().status(run_id)

    @router.post("/{run_id}/stop", response_model=GRPOStatus)
    async def stop(run_id: str) -> Any:
        """Write the final checkpoint and finish the run."""
        return await service.require().stop(run_id)

    @router.get("/{run_id}/model", response_class=Response,
                responses={200: {"content": {"application/gzip": {}}}})
    async def model(run_id: str) -> Response:
        """The run's current model (for LoRA, the adapter) and tokenizer, as a .tar.gz."""
        data = await service.require().archive(run_id)
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{run_id}.tar.gz"'})

    return router

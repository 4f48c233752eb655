"""The model file and its current weights, for clients that act locally."""


from typing import Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from policy_server.gateway.auth import Auth
from policy_server.gateway.policy.router import ERRORS
from policy_server.gateway.policy.service import PolicyService
from policy_server.policies.codec import encode_weights


class Weights(BaseModel):
    model_version: int
    weights: dict[str, dict[str, Any]] = Field(
        description="Per parameter: `dtype`, `shape`, and `data` (its little-endian bytes, base64)."
    )


class Version(BaseModel):
    model_version: int


def model_router(service: PolicyService, auth: Auth, prefix: str, model: bytes, fmt: str) -> APIRouter:
    """The model file and its current weights, for clients that act locally."""
    router = APIRouter(prefix=prefix, tags=[service.policy.name], dependencies=[Depends(auth)], responses=ERRORS)

    @router.get("/model", response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
    async def get_model() -> Response:
        """The model file as served at version 0 (`X-Model-Format`: `export` or `torchscript`);
        load it with `torch.export.load` or `torch.jit.load`, then apply `/weights`."""
        return Response(model, media_type="application/octet-stream", headers={"X-Model-Format": fmt})

    @router.get("/weights", response_model=Weights, responses={304: {"description": "Not modified."}})
    async def get_weights(if_none_match: str | None = Header(None)) -> Response:
        """The weights served now and their version. Send `If-None-Match: "<version>"` to get a
        304 when the version has not changed."""
        backend = service.require_backend()
        if if_none_match is not None and if_none_match.strip('W/"') == str(await backend.version()):
            return Response(status_code=304, headers={"ETag": if_none_match})
        weights, version = await backend.snapshot()
        return JSONResponse(
            {"model_version": version, "weights": encode_weights(weights)}, headers={"ETag": f'"{version}"'}
        )

    @router.get("/version", response_model=Version)
    async def get_version() -> Any:
        """The model version served now."""
        return {"model_version": await service.require_backend().version()}

    return router

"""Routes that take a binary body (``.npy``, safetensors) beside their JSON one (``binary``).

FastAPI reads one body type per route, so a route here is two: the JSON route as FastAPI builds
it (its pydantic model, its OpenAPI document), and a hidden twin over the same path and
dependencies (the api key, ``X-Policy-Version``, a policy id) whose endpoint reads the raw body.
The request's ``Content-Type`` picks the twin; the OpenAPI document lists both bodies
(``binary_doc``).
"""

# No `from __future__ import annotations`: FastAPI must see the endpoints' annotations as real types.

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from policy_server.errors import UnsupportedMediaType
from policy_server.gateway.policy.binary import BINARY_TYPES, NPY, SAFETENSORS, media_type

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def binary_route(
    binary_endpoint: Callable[..., Awaitable[Response]], base: type[APIRoute] = APIRoute
) -> type[APIRoute]:
    """A route class (a ``base``) whose requests with a binary ``Content-Type`` go to
    ``binary_endpoint`` (a FastAPI endpoint: it gets the route's dependencies and path
    parameters), the others to the route's own (JSON) endpoint."""

    class BinaryBodyRoute(base):  # type: ignore[valid-type,misc]
        def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
            # built before the JSON route: APIRoute.__init__ ends by building the handler
            self.binary = APIRoute(
                path, binary_endpoint, methods=kwargs.get("methods"), dependencies=kwargs.get("dependencies"),
                dependency_overrides_provider=kwargs.get("dependency_overrides_provider"), include_in_schema=False,
            )
            super().__init__(path, endpoint, **kwargs)

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            json_handler, binary_handler = super().get_route_handler(), self.binary.get_route_handler()

            async def handler(request: Request) -> Response:
                media = media_type(request.headers.get("content-type"))
                if media in BINARY_TYPES:
                    return await binary_handler(request)
                if media and media != "application/json" and not media.endswith("+json"):
                    raise UnsupportedMediaType(
                        f"Content-Type {media}: this route reads application/json, {NPY} or {SAFETENSORS}")
                return await json_handler(request)

            return handler

    return BinaryBodyRoute


def binary_doc(npy: str | None, safetensors: str) -> dict[str, Any]:
    """``openapi_extra`` of a route that takes binary bodies: its request body's ``.npy`` and
    safetensors forms, beside FastAPI's JSON one; ``npy`` None: no ``.npy`` form."""
    def form(description: str) -> dict[str, Any]:
        return {"schema": {"type": "string", "format": "binary", "description": description}}

    content = {SAFETENSORS: form(safetensors)} | ({NPY: form(npy)} if npy is not None else {})
    return {"requestBody": {"content": content}}


def post_with_binary(
    router: APIRouter, path: str, binary_endpoint: Callable[..., Awaitable[Response]], doc: dict[str, Any],
    **kwargs: Any,
) -> Callable[[Endpoint], Endpoint]:
    """``@router.post(path, **kwargs)`` for a JSON endpoint whose route also takes the binary bodies
    that ``binary_endpoint`` reads (``doc``: ``binary_doc``); the router's own route class stays
    the base of the route's."""

    def register(endpoint: Endpoint) -> Endpoint:
        route_class = binary_route(binary_endpoint, router.route_class)
        router.add_api_route(path, endpoint, methods=["POST"], openapi_extra=doc,
                             route_class_override=route_class, **kwargs)
        return endpoint

    return register

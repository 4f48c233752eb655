"""Client SDKs generated from the OpenAPI document (``/clients``)."""

from fastapi import FastAPI

from policy_server.gateway.auth import Auth
from policy_server.gateway.sdks.router import clients_router
from policy_server.sdks import ClientSDKs


def mount(app: FastAPI, sdks: ClientSDKs | None, auth: Auth, prefix: str) -> None:
    if sdks is not None:
        app.include_router(clients_router(sdks, app.openapi, auth), prefix=prefix)

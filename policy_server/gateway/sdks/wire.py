"""Response models of the SDK routes."""

from pydantic import BaseModel, Field

from policy_server.sdks import LanguageState, RunStatus


class ClientsStatus(BaseModel):
    status: RunStatus = Field(description="pending (not started), running, ready or failed.")
    languages: dict[str, LanguageState] = Field(
        description="Per language; `missing`: a tool is not installed."
    )
    notes: dict[str, str] = Field(description="Why a language is missing or failed.")
    error: str | None = Field(description="Why the generation failed as a whole.")

"""GRPO run settings (policy_server.llm.grpo_settings): one pydantic model for requests and checkpoints."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from policy_server.llm.grpo_settings import GRPOSettings


@pytest.mark.parametrize(
    ("bad", "field"),
    [({"group_size": 1}, "group_size"), ({"clip_eps": 1.0}, "clip_eps"), ({"stop_strings": [""]}, "stop_strings")],
)
def test_invalid_settings_name_the_field(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        GRPOSettings.model_validate(bad)
    assert info.value.errors()[0]["loc"][0] == field


def test_recorded_settings_round_trip_and_leave_out_the_former_constants() -> None:
    settings = GRPOSettings(group_size=3, stop_strings=["\n"], lora=False)
    assert GRPOSettings.recorded(settings.model_dump()) == settings
    legacy = settings.model_dump() | {"max_pending_groups": 1024, "reward_window": 20, "lora_target_modules": "all-linear"}
    assert GRPOSettings.recorded(legacy) == settings

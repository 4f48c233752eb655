"""Policy models as plain objects: loading, forward passes, action-space maths."""

from policy_server.policies.spaces import ActionSample, ActionSpace, make_action_space
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy, load_module

__all__ = [
    "ActionSample",
    "ActionSpace",
    "PolicyOutput",
    "TorchPolicy",
    "load_module",
    "make_action_space",
]

"""policy-server: schema-driven serving of reinforcement-learning policies on Ray Serve."""

from policy_server.errors import PolicyServerError, SchemaError
from policy_server.settings import Settings

__all__ = ["PolicyServerError", "SchemaError", "Settings", "__version__"]
__version__ = "0.1.0"

"""The plugin's errors: each carries a message a person can act on (shown in the message bar)."""
from __future__ import annotations


class PluginError(Exception):
    """Base of every error the plugin reports to the user."""

    title = "RS-MoE"


class ConfigurationError(PluginError):
    """No engine is configured, or the configuration is unusable."""

    title = "RS-MoE engine not configured"


class EngineError(PluginError):
    """Something went wrong talking to the engine."""

    title = "RS-MoE engine"


class EngineStartError(EngineError):
    """The engine process could not be started or did not become ready."""

    title = "RS-MoE engine did not start"


class EngineUnreachableError(EngineError):
    """Nothing answers at the engine's URL."""

    title = "RS-MoE engine not reachable"


class EngineConnectionLost(EngineError):
    """The connection broke while a request was in flight (the engine may have died)."""

    title = "RS-MoE engine connection lost"


class EngineDiedError(EngineError):
    """The engine process exited while it was working on a request."""

    title = "RS-MoE engine stopped"


class EngineTimeoutError(EngineError):
    """The engine did not answer in time."""

    title = "RS-MoE engine timed out"


class TokenRefusedError(EngineError):
    """The engine refused the token (401 / 403)."""

    title = "RS-MoE engine refused the token"


class EngineRequestError(EngineError):
    """The engine answered with an error (4xx / 5xx) and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadLayerError(PluginError):
    """The layer (or region) cannot be sent to the engine."""

    title = "RS-MoE: unsuitable layer"


class CancelledByUser(PluginError):
    """The user cancelled the work."""

    title = "RS-MoE: cancelled"

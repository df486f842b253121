"""Typed errors raised where input enters tokenmill; each message says what was wrong and what is allowed."""


class TokenmillError(Exception):
    """Base class of every error tokenmill raises on purpose."""


class InvalidParameterError(TokenmillError, ValueError):
    """A request or configuration value is out of its allowed range."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidParameterError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class RequestTooLargeError(InvalidParameterError):
    """The request could never fit the KV cache, however long it waited."""


class ModelLoadError(TokenmillError):
    """A model path is missing, unreadable, truncated or of an unsupported kind."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one tokenmill implements."""


class EngineOverloadedError(TokenmillError):
    """Too many requests are already waiting; the caller should retry later."""


class EngineStoppedError(TokenmillError):
    """The engine is shutting down and takes no new requests."""


class IncompatibleDraftError(ModelLoadError):
    """A speculative draft model does not fit its target (another vocabulary, width or tokenizer)."""

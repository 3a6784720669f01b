"""The engine's exceptions. Each docstring is the default message; messages say what to do.

Everything the engine raises on purpose derives from :class:`EngineError`, so the bot can catch
one type and show the message to the member as it is.
"""

from __future__ import annotations


class EngineError(Exception):
    """The image engine failed; try again, and tell the server owner if it keeps failing."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ModelLoadError(EngineError):
    """The model could not be loaded; check `model.source` in config.toml."""


class JobCancelled(EngineError):
    """The job was cancelled before it finished, so it has no image."""


class GenerationError(EngineError):
    """This job failed (bad init image or numbers that went out of range); change the settings and try again."""

"""Errors that describe what is wrong with the user's input and what to do about it."""


class InputError(ValueError):
    """The input (image, label, file, argument) cannot be used; the message says why and what to do."""


class ModelFileError(InputError):
    """A model file is missing, malformed, or fails its integrity check."""


class CancelledError(RuntimeError):
    """The user cancelled a long-running operation; nothing was written."""

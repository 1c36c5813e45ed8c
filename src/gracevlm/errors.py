"""Exception types. Every message says what is wrong, where, and how to fix it."""


class GraceVLMError(Exception):
    """Base class of all errors raised on purpose by gracevlm."""


class FormatError(GraceVLMError, ValueError):
    """A tensor or file does not have the layout the format requires."""


class CheckpointError(GraceVLMError, ValueError):
    """A checkpoint folder is missing, incomplete or inconsistent."""


class InputError(GraceVLMError, ValueError):
    """A user-supplied input (image, prompt, argument) is unusable."""

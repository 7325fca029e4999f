"""User-facing error types.

Everything a user can get wrong (a file, a shape, an option) raises a subclass of
:class:`SaeuronError` with a message that says what was expected. The CLI turns these
into ``error: ...`` and exit status 2; the ComfyUI nodes show the message as is.
"""

from __future__ import annotations


class SaeuronError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class SAEFormatError(SaeuronError, ValueError):
    """An SAE file or folder is missing, corrupt, unsafe or of an unknown layout."""


class ConfigError(SaeuronError, ValueError):
    """An option or configuration value is out of range or inconsistent."""


class HookError(SaeuronError, ValueError):
    """A hook point does not exist in the model or its output cannot be read as tokens."""


class StoreError(SaeuronError, ValueError):
    """An activation store is missing, corrupt or was made with other settings."""

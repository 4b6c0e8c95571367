"""Exceptions that fastdit raises for bad input. Each message names what to fix."""


class FastditError(ValueError):
    """Base class: bad user input (paths, checkpoints, arguments). Never a bug in fastdit."""


class CheckpointError(FastditError):
    """A checkpoint folder, index, shard or tensor that cannot be loaded. The message names the file/key."""


class ConfigError(FastditError):
    """A model or run configuration that does not fit together."""


class LoraError(FastditError):
    """A LoRA file or state dict that cannot be read or does not fit the model. The message names the file and
    the layer (in diffusers' naming) to fix."""


class RunFailed(Exception):
    """A run stopped for a reason outside the user's input (a rank died, the device failed). Not a FastditError:
    the command prints it in one line and exits 1, as opposed to 2 for bad input."""

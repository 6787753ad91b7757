"""Errors raised while reading or converting checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, of the wrong kind, or does not
    match the model it is loaded into. The message names the file and the key."""


class UnsafePickleError(CheckpointError):
    """A pickled checkpoint asked to import or call something other than the
    tensor-rebuilding functions a PyTorch state dict needs. Nothing was run."""

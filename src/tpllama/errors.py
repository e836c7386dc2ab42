"""The exceptions a user of tpllama meets, in one light module (the CLI maps them to exit codes
without importing torch)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, truncated or holds tensors of the wrong shape."""


class ShardError(ValueError):
    """A world size (or shares) this model cannot be split into."""


class RankFailure(RuntimeError):
    """Another rank died, hung past the timeout, or a collective failed."""


class ModelFetchError(RuntimeError):
    """The default model could not be fetched or failed its checksum."""

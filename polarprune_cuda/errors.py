"""Every exception polarprune_cuda raises on purpose, in one place (the lowest floor: imports nothing of the package).

Bad arguments are ``ValueError`` / ``TypeError`` naming the argument; the classes here say more where a caller
may want to catch one kind. Each is also importable from the module that raises it.
"""
from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``POLARPRUNE_BACKEND``) but cannot run here; the message says why."""


class NonFiniteGateError(ValueError):
    """Gate scores hold NaN or inf; the message names the layer."""


class UnsupportedModelError(ValueError):
    """The model has a structure whose channels cannot be gated and removed exactly."""


class IntegrityError(ValueError):
    """A file's contents do not match the digest written with it (or it has none)."""


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, was changed after it was written, or was written by a run with other settings."""


class RunFolderError(ValueError):
    """The output folder cannot be used: not polarprune's, in use by another run, or not a folder."""


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where we looked; the message says where and how to get them."""


class ImageReadError(ValueError):
    """An image of a data set folder cannot be read; the message names its path."""


__all__ = ["BackendUnavailableError", "CheckpointError", "DatasetNotFoundError", "ImageReadError", "IntegrityError",
           "NonFiniteGateError", "RunFolderError", "UnsupportedModelError"]

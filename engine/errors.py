"""One exception hierarchy for the whole product.

Every error a person can cause or fix derives from :class:`RSMoEError`; the CLI maps it to a
one-line message and ``exit_code``, the HTTP service to ``http_status``. Anything else is a bug.
"""
from __future__ import annotations


class RSMoEError(Exception):
    """Base class: a failure with a message a person can act on."""

    exit_code: int = 1
    http_status: int = 500


class UserInputError(RSMoEError):
    """The request itself is wrong (bad argument, bad file, bad extent, too long a question)."""

    exit_code = 2
    http_status = 400


class InputNotFoundError(UserInputError):
    """A file or directory named by the user does not exist."""

    exit_code = 2
    http_status = 404


class RasterError(UserInputError):
    """A raster cannot be opened or read (corrupt, truncated, not a raster, empty window)."""

    exit_code = 2
    http_status = 422


class MissingExtraError(UserInputError):
    """An optional part of the engine was asked for but its extra is not installed (e.g. Ray: ``rsmoe[distributed]``)."""

    exit_code = 2
    http_status = 400


class ModelDirError(RSMoEError):
    """A model directory is missing, incomplete or has an invalid config."""

    exit_code = 3
    http_status = 500


class MissingBaseWeightsError(RSMoEError):
    """Pretrained base weights are not provisioned; the message says how to provision them."""

    exit_code = 4
    http_status = 503


class CorruptWeightsError(RSMoEError):
    """A weights file exists but cannot be read or does not match its checksum or the model."""

    exit_code = 5
    http_status = 500


class JobError(RSMoEError):
    """A batch job cannot be created, found or resumed."""

    exit_code = 6
    http_status = 409


class JobNotFoundError(JobError):
    http_status = 404


class RastersFailedError(RSMoEError):
    """A job over several rasters ended with some of them failed; each one's error is in the job's index."""

    exit_code = 7
    http_status = 422


class CancelledError(RSMoEError):
    """A job was cancelled by the user; partial results stay in its journal."""

    exit_code = 130
    http_status = 409

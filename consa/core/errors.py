"""Errors a user can fix. The CLI prints them without a traceback; the service reports them as user errors."""


class ConsaError(Exception):
    """A problem with the user's input (model, data, settings), not a fault of consa."""

    code = "invalid_request"


class ModelLoadError(ConsaError):
    code = "model_not_loadable"


class UnsupportedModelError(ConsaError):
    code = "model_not_supported"


class DataError(ConsaError):
    code = "dataset_invalid"


class Cancelled(Exception):
    """Raised inside the search loop when the cancel hook says stop."""

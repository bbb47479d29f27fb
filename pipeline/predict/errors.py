"""The one error type of prediction, below every module of the package (inputs and model both raise it)."""


class PredictError(ValueError):
    """A prediction that cannot start: a MODEL, an input list or an option that is wrong. The message says
    which, and what to do."""

"""Exception type for problems with input data (files, folders, datalists, manifests)."""


class DataError(ValueError):
    """Raised when input data is missing, malformed or inconsistent.

    Messages always name the offending file or folder so that a broken sample in a
    dataset of thousands can be found without a debugger.
    """

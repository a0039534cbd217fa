"""The data layer's errors: each message names the problem and the fix."""


class DataError(ValueError):
    """A dataset that is missing, malformed or wrongly requested; the message says the fix."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset's files are not where they were looked for."""

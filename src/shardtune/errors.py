"""Errors a user can fix: reported as one line naming the field, row or file."""


class UserError(ValueError):
    """Bad input (config value, data row, path). The message says what and where."""


class DataError(UserError):
    """A bad row or a data setting that cannot work; the message names the row."""

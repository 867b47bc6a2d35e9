"""The error a conversion raises for bad input; the tools turn it into a message and exit code 2."""


class ConversionError(Exception):
    """Bad input to a conversion (the message names the problem); nothing has been written."""

"""The error a conversion raises for bad input; the tools turn it into a message and exit code 2."""

from megatron_eopd.errors import EOPDError


class ConversionError(EOPDError):
    """Bad input to a conversion (the message names the problem); nothing has been written."""

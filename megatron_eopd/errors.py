"""The root of this package's exceptions.

Every error the package raises on purpose derives from :class:`EOPDError` as well as from the
built-in exception it has always been (``ValueError`` for bad input, ``RuntimeError`` for a
failed operation), so ``except EOPDError`` catches all of ours and nothing of torch's or
Megatron's, while existing ``except ValueError`` handlers keep working.
"""


class EOPDError(Exception):
    """Base class of megatron-eopd's own exceptions."""

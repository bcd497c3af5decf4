"""The one exception hierarchy of d3mfmt.

Every error the package raises on purpose derives from :class:`D3MError`, a
``ValueError``, so ``except d3mfmt.D3MError`` catches all of them.
"""


class D3MError(ValueError):
    """Root of every error d3mfmt raises on purpose."""


class D3MFormatError(D3MError):
    """An archive (or the data about to be written as one) breaks the format."""


class D3MModelError(D3MError):
    """A model id, path or revision cannot be resolved, or does not match."""

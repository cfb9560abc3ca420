"""The errors of the portable format: every refused file is a one-line
:class:`PortableFileError` (a ValueError)."""

from __future__ import annotations


class PortableFileError(ValueError):
    """A portable file cannot be loaded: the message (one line) names the problem."""


class CorruptFileError(PortableFileError):
    """The file is truncated, damaged, or not a cvsparse portable file."""


class UnsupportedVersionError(PortableFileError):
    """The file was written in a format version this cvsparse does not read."""


class RefusedContentError(PortableFileError):
    """The file names a module type, function or method outside the whitelist."""


class UnsupportedModelError(ValueError):
    """:func:`save` cannot describe this model with the whitelist (or cannot trace it)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name if empty), at most 200 characters:
    what an error about a file quotes of the exception beneath it."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]

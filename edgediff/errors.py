"""Errors that map onto the command line's exit codes (docs/architecture.md, "Exit codes")."""

from __future__ import annotations


class EdgediffError(Exception):
    """Base class: an expected failure with a one-line message and an exit code."""

    exit_code = 1


class BadInput(EdgediffError):
    """The user's input is wrong (exit 2): the message names the file and the problem."""

    exit_code = 2


class Unavailable(EdgediffError):
    """A target, runtime or feature is not available here (exit 3): the message says what to install."""

    exit_code = 3


class OutOfTolerance(EdgediffError):
    """Verification ran and the result is outside tolerance (exit 4)."""

    exit_code = 4

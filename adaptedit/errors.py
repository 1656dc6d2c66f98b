"""Errors that reach the user as one line (see cli.main)."""


class AdapteditError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class UsageError(AdapteditError):
    """A bad combination of command-line options (exit code 2)."""

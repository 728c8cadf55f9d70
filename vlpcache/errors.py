"""Errors that are the user's to fix: the CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


class ItemError(Exception):
    """One input item cannot be processed (corrupt, unreadable, no video stream...); the run goes on."""

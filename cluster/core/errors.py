"""The one base class of errors a user can fix (a bad config, a missing model, a wrong name).

Every command and job catches `UserError` at its boundary and prints `error: <message>` with exit
code 2, never a traceback: the message is written for the person who typed the command.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done as asked. The message says what and why."""

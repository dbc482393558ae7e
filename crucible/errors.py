"""The project's small exception hierarchy.

``UserError`` and its subclasses are problems a user can cause and fix (a bad config key, a
missing input file, a corrupt shard). Entry scripts turn them into one clear line and exit
status 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message says what and how to fix it."""


class ConfigError(UserError):
    """A configuration file or override is invalid."""


class DataError(UserError):
    """Input data is missing, malformed or inconsistent."""

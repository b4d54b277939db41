"""Errors a user can cause; the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (path, config, argument): shown without a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, key or file; the message names the key."""

"""Errors a user can cause; the CLI prints them as one line and exits 2."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class UserError(Exception):
    """Bad input from the user (path, config, argument): shown without a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, key or file; the message names the key."""


def check_plain_name(name: str, what: str) -> None:
    """A name that becomes a file or folder name must stay in its folder: no path separator,
    not `.` or `..`, no control characters."""
    if not name or name in (".", "..") or any(c in name for c in "/\\") or \
            any(ord(c) < 32 for c in name):
        raise ConfigError(f"{what}: {name!r} must be a plain name (no / or \\, not . or ..), "
                          "since it names a file or folder")


def worker_message(message: str) -> str:
    """A user error raised in a DataLoader worker reaches the main process wrapped in "Caught
    UserError in DataLoader worker process N" and the worker's traceback: its own message back."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("Error: ", 1)[-1]

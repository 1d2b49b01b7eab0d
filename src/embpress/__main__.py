"""``embpress`` (and ``python -m embpress``): the command line, when its extra is installed.

The command needs click and rich (``pip install 'embpress[cli]'``); the library does not.
Without them this entry point prints one line saying so instead of a traceback.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

_CLI_MODULES = ("click", "rich")
HINT = "pip install 'embpress[cli]'"


def main() -> None:
    """Console entry point: import the CLI only now, so that a missing extra is one line."""
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in _CLI_MODULES:
            raise
        print(
            f"error: the embpress command needs {missing}, which is not installed: {HINT}",
            file=sys.stderr,
        )
        sys.exit(1)
    cli_main()


if __name__ == "__main__":
    main()

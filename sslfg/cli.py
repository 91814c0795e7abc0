"""What every entry point does around its work: logging, and one clear line for a user error."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from sslfg.config import ConfigError
from sslfg.data.images import DataError
from sslfg.engine.loop import NonFiniteLossError

USER_ERRORS = (ConfigError, DataError, NonFiniteLossError)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)`; a user error prints `error: <message>` (no traceback) and returns 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""The one base class of every verl-mtp error, and the one way verl-mtp reports loudly.

Every exception verl-mtp raises derives from ``VerlMtpError`` (and, where callers already catch a
builtin, from that builtin too), so a user can catch "anything verl-mtp refused" in one clause.

``report_loudly`` is for what must not pass unseen but does not stop the process (a patch that
failed to apply where the run may not need it, a drafter found out of sync under ``warn``): Ray
workers' stderr is what users read, loggers are often silenced there, and tests catch warnings,
so it uses all three.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

logger = logging.getLogger("verl_mtp")


class VerlMtpError(Exception):
    """Base class of every error verl-mtp raises."""


class MtpConfigError(VerlMtpError, ValueError):
    """A bad setting, found before any work starts. The message names the key, the bad value and
    the valid choices (``invalid_value`` writes it)."""


def invalid_value(key: str, value: Any, expected: str) -> str:
    """The one wording of a bad-input message: ``key=value is invalid: <valid choices / why>``."""
    return f"{key}={value!r} is invalid: {expected}"


class VerlMtpWarning(RuntimeWarning):
    """Base class of verl-mtp's warnings."""


def report_loudly(message: str, category: type[Warning] = VerlMtpWarning, *, stacklevel: int = 2) -> None:
    """Say ``message`` on stderr, in the ``verl_mtp`` logger and as a ``category`` warning."""
    print(f"[verl-mtp] {message}", file=sys.stderr, flush=True)
    logger.warning(message)
    warnings.warn(message, category, stacklevel=stacklevel + 1)

"""One exception tree for the whole platform.

Client and server code raise these (never bare ``ValueError`` for bad input that a user
can fix), so that CLIs can print a clear message and the ClientApp error mod can map an
exception to a fixed, non-identifying reason code before anything leaves a site.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "PrivacyBudgetError",
    "SicfedError",
    "SiteError",
]


class SicfedError(Exception):
    """Base class of every error this platform raises on purpose."""

    #: Fixed, non-identifying code that may cross a site's boundary.
    reason: str = "error"


class ConfigError(SicfedError):
    """A configuration file or field is invalid; the message names the field."""

    reason = "config_error"


class DataError(SicfedError):
    """An input (image, label file, data set) cannot be used.

    Parameters
    ----------
    message
        Human-readable explanation (may name a local path: it stays at the site).
    reason
        Fixed reason code such as ``decode_error``, ``no_pixels``, ``multiframe``.
    """

    def __init__(self, message: str, *, reason: str = "data_error") -> None:
        super().__init__(message)
        self.reason = reason


class PrivacyBudgetError(SicfedError):
    """Training would take a site past its privacy budget."""

    reason = "privacy_budget_exhausted"


class SiteError(SicfedError):
    """A site failed a round for a reason it can name with a fixed code."""

    def __init__(self, message: str, *, reason: str = "site_error") -> None:
        super().__init__(message)
        self.reason = reason

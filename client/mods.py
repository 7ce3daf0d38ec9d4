"""ClientApp mods (Flower 1.41 Message API).

:func:`sanitise_errors` keeps exception text at the site. Flower would send an exception's
message to the server (it may name a file, a path or a patient); this mod logs the full
error with its traceback in the site's log and replies with a fixed reason code (and the
site's pseudonym) only.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client.config import load_site_config
from sic_core.errors import SicfedError
from sic_core.wire import ErrorReason, format_error, is_error_reason, parse_error

__all__ = ["reason_code", "sanitise_errors", "site_name"]

log = logging.getLogger(__name__)


def reason_code(error: BaseException) -> str:
    """The fixed code that may leave the site for ``error``.

    A :class:`~sic_core.errors.SicfedError` sends its ``reason`` if that is a well-formed
    code (:func:`sic_core.wire.is_error_reason`); anything else is ``internal_error``.
    """
    if isinstance(error, SicfedError) and is_error_reason(str(error.reason)):
        return str(error.reason)
    return str(ErrorReason.INTERNAL_ERROR)


def site_name(context: Context) -> str | None:
    """The site's pseudonym from its config, or ``None`` if the config cannot be read."""
    path = context.node_config.get("site-config")
    if not isinstance(path, str):
        return None
    try:
        return load_site_config(path).name
    except SicfedError:
        return None


def sanitise_errors(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler; on an exception, log it here and reply with a reason code only.

    The error reply's text is ``"<reason>@<site>"`` (:func:`sic_core.wire.format_error`).
    Error replies produced further down are replaced the same way, so no free text ever
    leaves the site.
    """
    try:
        reply = call_next(message, context)
    except Exception as error:
        code = reason_code(error)
        log.exception(
            "%s message failed at this site (sent as %r)", message.metadata.message_type, code
        )
        return _error_reply(message, context, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, code)
    if reply.has_error() and parse_error(reply.error.reason or "") is None:
        log.error("%s handler returned an error: %s", message.metadata.message_type, reply.error)
        return _error_reply(message, context, reply.error.code, str(ErrorReason.INTERNAL_ERROR))
    return reply


def _error_reply(message: Message, context: Context, code: int, reason: str) -> Message:
    text = format_error(reason, site_name(context))
    return Message(Error(code=code, reason=text), reply_to=message)

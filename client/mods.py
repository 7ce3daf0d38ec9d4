"""ClientApp mods (Flower 1.41 Message API).

:func:`sanitise_errors` keeps exception text at the site. Flower would send an exception's
message to the server (it may name a file, a path or a patient); this mod logs the full
error with its traceback in the site's log and replies with a fixed reason code only.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from sic_core.errors import SicfedError
from sic_core.wire import ErrorReason, is_error_reason

__all__ = ["reason_code", "sanitise_errors"]

log = logging.getLogger(__name__)


def reason_code(error: BaseException) -> str:
    """The fixed code that may leave the site for ``error``.

    A :class:`~sic_core.errors.SicfedError` sends its ``reason`` if that is a well-formed
    code (:func:`sic_core.wire.is_error_reason`); anything else is ``internal_error``.
    """
    if isinstance(error, SicfedError) and is_error_reason(str(error.reason)):
        return str(error.reason)
    return str(ErrorReason.INTERNAL_ERROR)


def sanitise_errors(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler; on an exception, log it here and reply with a reason code only.

    Error replies produced further down (none of their text is ours) are replaced the same
    way, so no free text ever leaves the site.
    """
    try:
        reply = call_next(message, context)
    except Exception as error:
        code = reason_code(error)
        log.exception(
            "%s message failed at this site (sent as %r)", message.metadata.message_type, code
        )
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=code), reply_to=message
        )
    if reply.has_error() and not is_error_reason(reply.error.reason or ""):
        log.error("%s handler returned an error: %s", message.metadata.message_type, reply.error)
        return Message(
            Error(code=reply.error.code, reason=str(ErrorReason.INTERNAL_ERROR)), reply_to=message
        )
    return reply

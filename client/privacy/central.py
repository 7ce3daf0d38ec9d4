"""Client-side clipping for the optional client-level central DP (run config ``central-dp``).

The server wraps its aggregator in Flower's ``DifferentialPrivacyClientSideFixedClipping``,
which puts the clipping norm into every ``train`` message's config; each site must then clip
its model update to that norm before replying, which is what Flower's ``fixedclipping_mod``
does. That mod expects exactly one ``ArrayRecord`` in the incoming message, and sicfed's
``train`` messages carry two (the weights and the global support set), so
:func:`central_dp_clipping` hides the support record from the mod (it is public and not
part of the update) and hands it back to the handler unchanged. Messages without the
clipping norm (central DP off) pass through untouched.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from sic_core.wire import RecordKey

__all__ = ["central_dp_clipping"]


def _clipping_requested(message: Message) -> bool:
    config = message.content.get(str(RecordKey.CONFIG))
    return config is not None and KEY_CLIPPING_NORM in config


def central_dp_clipping(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Clip this site's ``train`` update with Flower's ``fixedclipping_mod`` when asked to."""
    if message.metadata.message_type != MessageType.TRAIN or not _clipping_requested(message):
        return call_next(message, context)
    support_key = str(RecordKey.SUPPORT)
    support = message.content.get(support_key)
    if support is None:
        return fixedclipping_mod(message, context, call_next)
    del message.content[support_key]

    def handler_with_support(inner: Message, inner_context: Context) -> Message:
        inner.content[support_key] = support
        return call_next(inner, inner_context)

    return fixedclipping_mod(message, context, handler_with_support)

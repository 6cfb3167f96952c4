"""Public face of the sans-IO wire protocol (see docs/protocol.md)."""

from ._errors import ProtocolError
from ._fastpath import decode_get_pages_reply_fast, ok_get_pages_reply
from ._protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    DbSizeReply,
    DbSizeRequest,
    GetPagesReply,
    GetPagesRequest,
    Kind,
    RelSizeReply,
    RelSizeRequest,
    Reply,
    Request,
    RequestClass,
    SlruKind,
    SlruSegmentReply,
    SlruSegmentRequest,
    Status,
    decode_reply,
    decode_request,
    encode_get_pages,
    encode_reply,
    encode_request,
    error_reply,
    peek_request_id,
)

__all__ = [
    "MAX_MESSAGE_BYTES", "PROTOCOL_VERSION", "DbSizeReply", "DbSizeRequest", "GetPagesReply",
    "GetPagesRequest", "Kind", "ProtocolError", "RelSizeReply", "RelSizeRequest", "Reply",
    "Request", "RequestClass", "SlruKind", "SlruSegmentReply", "SlruSegmentRequest", "Status",
    "decode_get_pages_reply_fast", "decode_reply", "decode_request", "encode_get_pages",
    "encode_reply", "encode_request", "error_reply", "ok_get_pages_reply", "peek_request_id",
]

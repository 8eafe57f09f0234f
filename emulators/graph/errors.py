"""Graph's error answer: ``{"error": {"code", "message", "innerError": {...}}}`` with a status and headers."""
from __future__ import annotations

import datetime as dt
import uuid


class GraphError(Exception):
    """An answer in Graph's error shape; raised anywhere below the HTTP layer."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    def body(self, request_id: str | None = None, client_request_id: str | None = None) -> dict:
        request_id = request_id or str(uuid.uuid4())
        return {"error": {"code": self.code, "message": self.message, "innerError": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "request-id": request_id, "client-request-id": client_request_id or request_id}}}


def not_found_item() -> GraphError:
    return GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")


def malformed_id() -> GraphError:
    return GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")


def bad_request(message: str, code: str = "BadRequest") -> GraphError:
    return GraphError(400, code, message)

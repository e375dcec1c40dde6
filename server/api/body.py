"""Strict JSON request bodies: UTF-8, no content encoding, bounded nesting; anything else is 422.

FastAPI parses a JSON body with `json.loads` and answers 400 for whatever that raises besides a
decode error: a non-UTF-8 or gzip body (UnicodeDecodeError), JSON nested past Python's recursion
limit (RecursionError) and an integer of more digits than Python converts (ValueError); and
`json.loads` of bytes guesses UTF-16 and skips a byte-order mark, which no other route accepted.
The contract says a malformed body is 422, so every JSON body is read by `parse_json_body`, which
names each problem: the routes of `StrictJSONRoute` (tasks, Hugging Face) through their request
(FastAPI's documented way to change how a request is read: a custom `APIRoute` with its own
`Request`), the OIP routes, which read their body whole for the binary extension, directly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException


def parse_json_body(body: bytes, content_encoding: str | None = None) -> Any:
    """The JSON value of a request body, or HTTPException(422) naming why not."""
    if content_encoding and content_encoding.strip().lower() != "identity":
        raise HTTPException(422, f"the body has Content-Encoding {content_encoding!r}; send plain JSON (UTF-8)")
    try:
        text = body.decode("utf-8")  # strict: also refuses encoded surrogates (ED A0 80)
    except UnicodeDecodeError as err:
        raise HTTPException(422, f"the body is not UTF-8 (byte 0x{body[err.start]:02x} at position {err.start}); "
                                 f"JSON bodies must be UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise HTTPException(422, "the body is JSON nested too deeply") from None
    except json.JSONDecodeError:
        raise  # the caller's own "not valid JSON" answer (FastAPI's names line and column)
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise HTTPException(422, f"the body has an integer of more than {sys.get_int_max_str_digits()} digits")  \
            from None


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body(), self.headers.get("content-encoding"))
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose JSON body goes through `parse_json_body` (decode errors stay FastAPI's 422)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict

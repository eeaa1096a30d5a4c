"""ASGI middleware that bounds requests before they reach the app: the body size (413) and how many
requests are inside the app at once."""

from fastapi import HTTPException


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with a 413 problem document, at once
    when its Content-Length says so, else as soon as the streamed bytes pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"the request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            from starlette.requests import Request

            from service.problems import problem_response

            response = problem_response(Request(scope, receive), 413, detail, code="request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI re-raises its own HTTPException from reading the body; the handlers make it
                # a problem document.
                raise HTTPException(413, detail)
            return message

        await self.app(scope, counted_receive, send)


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` requests inside the app at once; the rest wait here, holding
    nothing. FastAPI takes a request's database session before the route runs, so without this 200
    concurrent requests would ask the pool for 200 connections and time out on it (500s). An event
    stream gives its slot back once its headers are sent: it polls with its own short sessions."""

    def __init__(self, app, limit: int):
        import anyio

        self.app, self.semaphore = app, anyio.Semaphore(limit)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.semaphore.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.semaphore.release()

        async def send_and_release(message):
            if message["type"] == "http.response.start" and \
                    dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream"):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()

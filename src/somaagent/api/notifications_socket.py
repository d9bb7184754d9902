"""WebSocket `/v1/notifications/ws` (`notifications:read`): every notification for the connected person,
or (API keys) for their tenant, pushed as JSON as it is delivered, whichever replica delivers it.

Authenticate with the `authorization` header, or (browsers cannot set it) `?access_token=`. The query
string is wiped from the connection before anything can log it.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from somaagent.api.errors import status_for
from somaagent.api.services import Services
from somaagent.core.errors import Forbidden, SomaError
from somaagent.identity.capabilities import Capability

router = APIRouter(prefix="/v1/notifications", tags=["Notifications"])

RECHECK_S = 30.0  # an idle socket re-checks its credential this often (logout, revocation, expiry)


def _credential(websocket: WebSocket) -> str | None:
    header = websocket.headers.get("authorization")
    token = websocket.query_params.get("access_token")
    # Uvicorn logs the path with its query string on accept: the token must not be in it by then.
    websocket.scope["query_string"] = b""
    if header:
        return header
    return f"Bearer {token}" if token else None


@router.websocket("/ws")
async def notification_socket(websocket: WebSocket) -> None:
    """Pushes `{"type": "notification", "notification": {...}}`; first sends `{"type": "ready"}`."""
    services: Services = websocket.app.state.services
    credential = _credential(websocket)
    try:
        principal = await services.authenticator.authenticate(credential)
        if not principal.can(Capability.NOTIFICATIONS_READ):
            raise Forbidden("this needs the `notifications:read` capability", code="missing_capability")
    except SomaError as exc:
        status, _ = status_for(exc)
        await websocket.close(code=4000 + status, reason=exc.message[:120])
        return
    hub = services.notifications.hub
    is_admin = principal.can(Capability.NOTIFICATIONS_SEND)
    with hub.subscribe(principal.tenant_id, principal.user_id, is_admin) as subscriber:
        await websocket.accept()
        await websocket.send_text(
            orjson.dumps(
                {"type": "ready", "tenant_id": principal.tenant_id, "user_id": principal.user_id}
            ).decode()
        )

        async def drain_client() -> None:
            # Reading notices the client closing; what it sends is ignored.
            while True:
                await websocket.receive_text()

        reader = asyncio.create_task(drain_client())
        try:
            while not reader.done():
                getter = asyncio.ensure_future(subscriber.queue.get())
                done, _ = await asyncio.wait(
                    {getter, reader}, timeout=RECHECK_S, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                try:
                    await services.authenticator.authenticate(credential)
                except SomaError as exc:
                    await websocket.close(code=4401, reason=exc.message[:120])
                    return
                if getter in done:
                    await websocket.send_text(orjson.dumps(getter.result()).decode())
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away mid-send
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

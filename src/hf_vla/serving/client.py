"""A small synchronous client for `hf_vla.serving.server` (and any openpi-protocol policy server).

    with PolicyClient("127.0.0.1", 8000) as client:
        print(client.metadata["action_chunk_size"])
        actions = client.infer({"images": {"primary": image}, "prompt": "pick up the cup"})["actions"]

`infer` raises `ServerError` when the server answers with an error reply; `request` returns any reply as is. A reply
that does not come within `timeout` (or any failed receive) closes the connection: replies come in request order, so
the late one would otherwise answer the next request. Connect again to go on.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from websockets.sync.client import connect

from .msgpack_numpy import packb, unpackb

__all__ = ["PolicyClient", "ServerError"]


class ServerError(RuntimeError):
    """The server answered with an error reply (kept in `.reply`)."""

    def __init__(self, message: str, reply: Any = None):
        super().__init__(message)
        self.reply = reply


class PolicyClient:
    """One websocket connection; `metadata` is the map the server sends on connect."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, api_key: str | None = None,
                 timeout: float = 60.0):
        uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        if port is not None and not host.startswith(("ws://", "wss://")):
            uri += f":{port}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.timeout = timeout
        self._exit = ExitStack()  # websockets ≥ 17.1 wants connections entered as context managers
        self._ws = self._exit.enter_context(
            connect(uri, additional_headers=headers, compression=None, max_size=None, open_timeout=timeout)
        )
        self.metadata: dict = self._receive()  # closes the connection if it fails

    def infer(self, obs: dict) -> dict:
        """Sends one observation (openpi form) or StarVLA request; returns the reply, raising on an error reply."""
        reply = self.request(obs)
        if isinstance(reply, dict) and (reply.get("error") is not None or reply.get("ok") is False):
            error = reply.get("error")
            message = error.get("message", error) if isinstance(error, dict) else error
            raise ServerError(str(message), reply)
        return reply

    def configure(self, **options) -> dict:
        """Sets this connection's action post-processing (see the server's module docstring)."""
        return self.infer({"type": "configure", **options})

    def ping(self) -> dict:
        return self.infer({"type": "ping"})

    def request(self, message: Any) -> Any:
        """Sends any packable message and returns the decoded reply, error replies included."""
        return self.send_frame(packb(message))

    def send_frame(self, frame: bytes | str) -> Any:
        """Sends one raw frame (bytes → binary, str → text) and returns the decoded reply."""
        self._ws.send(frame)
        return self._receive()

    def _receive(self) -> Any:
        try:
            reply = self._ws.recv(timeout=self.timeout)
        except BaseException:
            # Replies come in request order: after a timeout the late reply would answer the next request.
            self.close()
            raise
        if isinstance(reply, str):  # openpi servers send tracebacks as text frames
            raise ServerError(f"error from the policy server:\n{reply}", reply)
        return unpackb(reply)

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

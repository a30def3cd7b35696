"""A small synchronous client for `hf_vla.serving.server` (and any openpi-protocol policy server).

    with PolicyClient("127.0.0.1", 8000) as client:
        print(client.metadata["action_chunk_size"])
        actions = client.infer({"images": {"primary": image}, "prompt": "pick up the cup"})["actions"]

`infer` raises `ServerError` when the server answers with an error: a text frame (how this server answers a bad
openpi-form request, and how openpi servers send tracebacks) or an error map. `request` returns any reply as is, a
text frame as a str. A reply that does not come within `timeout` (or any failed receive) closes the connection:
replies come in request order, so the late one would otherwise answer the next request. Connect again to go on.
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
        if not isinstance(self.metadata, dict):
            self.close()
            raise ServerError(f"expected the server's metadata map first, got: {self.metadata!r:.2000}", self.metadata)

    def infer(self, obs: dict) -> dict:
        """Sends one observation (openpi form) or StarVLA request; returns the reply, raising on an error reply."""
        reply = self.request(obs)
        if isinstance(reply, str):
            raise ServerError(reply, reply)
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
        return reply if isinstance(reply, str) else unpackb(reply)

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    import threading

    import numpy as np

    from ..policy import VLAPolicy
    from ..testing import build_tiny_vla
    from .server import PolicyServer

    model, processor = build_tiny_vla("oft")
    rng = np.random.default_rng(0)
    observation = {  # raw camera frames of any size: the server resizes them to the model's
        "images": {camera: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for camera in processor.camera_names},
        "prompt": "open the drawer",
        "state": rng.normal(size=processor.state_dim).astype(np.float32),
    }
    policy = VLAPolicy(model, processor)
    with PolicyServer(policy, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        meta = client.metadata
        print(f"ws://127.0.0.1:{server.port} serves {meta['model_type']}: cameras {meta['cameras']} at "
              f"{meta['training_obs_image_size']}, chunks of {meta['action_chunk_size']} × {meta['action_dim']}, "
              f"unnorm keys {meta['available_unnorm_keys']}")
        reply = client.infer(observation)
        actions = reply["actions"]
        print(f"actions {actions.dtype} {list(actions.shape)} in {reply['server_timing']['total_ms']:.0f} ms, "
              f"same as in-process predict: {np.allclose(actions, policy.predict(observation), atol=1e-5)}")
        client.configure(execute_steps=2, gripper_dims=[6])
        short = client.infer(observation)["actions"]
        print(f"after configure(execute_steps=2, gripper_dims=[6]): {list(short.shape)}, "
              f"gripper {actions[:2, 6].round(2)} → {short[:, 6]}")
        try:
            client.infer({"prompt": "no images"})
        except ServerError as error:
            print("error reply:", error)
    print("server threads left:", [t.name for t in threading.enumerate() if t.name.startswith("hf-vla")])

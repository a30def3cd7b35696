"""Serving a VLAPolicy over websockets (openpi and StarVLA protocols), and a client for it.

    from hf_vla.serving import PolicyServer, PolicyClient
    with PolicyServer(policy, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        actions = client.infer(obs)["actions"]

Needs the `serve` extra (websockets, msgpack). The protocol is described in `hf_vla.serving.server`.
"""

from .client import PolicyClient, ServerError
from .msgpack_numpy import Packer, packb, unpackb

_SERVER_NAMES = {"Limits", "PolicyServer", "PostProcess", "add_arguments", "main", "options_from_args", "serve"}


def __getattr__(name: str):
    # Lazy, so that `python -m hf_vla.serving.server` does not find its module already imported.
    if name in _SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Limits",
    "Packer",
    "PolicyClient",
    "PolicyServer",
    "PostProcess",
    "ServerError",
    "add_arguments",
    "main",
    "options_from_args",
    "packb",
    "serve",
    "unpackb",
]

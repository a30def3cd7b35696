"""Serving a VLAPolicy over websockets (openpi and StarVLA protocols), and a client for it.

    from hf_vla.serving import PolicyServer, PolicyClient
    with PolicyServer(policy, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        actions = client.infer(obs)["actions"]

Needs the `serve` extra (websockets, msgpack). The protocol is described in `hf_vla.serving.server`. Names are
imported lazily, so that `python -m hf_vla.serving.<module>` runs each module cleanly.
"""

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "PolicyClient": "client",
    "ServerError": "client",
    "Packer": "msgpack_numpy",
    "packb": "msgpack_numpy",
    "unpackb": "msgpack_numpy",
    "Limits": "protocol",
    "PostProcess": "protocol",
    **{name: "server" for name in ("PolicyServer", "add_arguments", "main", "options_from_args", "serve")},
}  # fmt: skip

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

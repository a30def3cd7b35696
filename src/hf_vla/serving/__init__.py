"""Serving a VLAPolicy over websockets (openpi and StarVLA protocols), and a client for it.

    from hf_vla.serving import PolicyServer, PolicyClient
    with PolicyServer(policy, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
        actions = client.infer(obs)["actions"]

Needs the `serve` extra (websockets, msgpack). The protocol is described in `hf_vla.serving.server`. Names are
imported lazily, so that `python -m hf_vla.serving.<module>` runs each module cleanly.
"""

from importlib import import_module

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


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__

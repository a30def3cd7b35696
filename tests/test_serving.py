"""The websocket policy server: protocols (openpi, StarVLA), auth, robustness, micro-batching, post-processing.

Loopback only, a tiny OFT model, bounded loops. The openpi-client check needs `pip install --no-deps
openpi-client==0.1.2`; the same paths are also covered with our own client.
"""

import argparse
import contextlib
import http.client
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
from conftest import make_oft
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from hf_vla import VLAPolicy, VLAProcessor
from hf_vla.serving import Limits, PolicyClient, PolicyServer, PostProcess, ServerError, packb, unpackb
from hf_vla.serving.batching import ClientActivity, MicroBatcher
from hf_vla.serving.msgpack_numpy import MAX_CONTAINERS, MAX_DEPTH
from hf_vla.serving.protocol import Row
from hf_vla.serving.server import add_arguments, options_from_args

CAMERAS = ("primary", "wrist")
TIMEOUT = 30
# openpi-client 0.1.2 connects without a context manager, which websockets ≥ 17.1 flags.
OPENPI_CONNECT_WARNING = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


@pytest.fixture(scope="module")
def policy(tiny_vlm_dirs):
    model, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"], action_dim=7, action_horizon=4, state_dim=6)
    rng = np.random.default_rng(1)
    processor.compute_norm_stats("other", rng.normal(2.0, 3.0, size=(256, 7)), rng.normal(size=(256, 6)))
    return VLAPolicy(model, processor, unnorm_key="bridge")


@pytest.fixture(scope="module")
def server(policy):
    limits = Limits(max_frame_bytes=1_000_000, max_array_bytes=100_000, max_request_rows=8)
    with PolicyServer(policy, port=0, unnorm_key="bridge", batch_window_ms=200, limits=limits) as server:
        yield server


def client_for(server, **kwargs):
    return PolicyClient("127.0.0.1", server.port, timeout=TIMEOUT, **kwargs)


def make_obs(seed, batch=None, size=48, prompt=None):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    images = {c: rng.integers(0, 256, (*lead, size, size, 3), dtype=np.uint8) for c in CAMERAS}
    words = ["pick", "place", "open", "close", "push", "the red", "blue", "cup", "drawer"]
    text = prompt or " ".join(rng.choice(words, size=3))
    instruction = text if batch is None else [f"{text} {b}" for b in range(batch)]
    return {"images": images, "instruction": instruction, "state": rng.normal(size=(*lead, 6)).astype(np.float32)}


# ---------------------------------------------------------------- wire format


def test_msgpack_numpy_round_trip_and_refusals():
    message = {
        "image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
        "state": np.linspace(0, 1, 5, dtype=np.float32)[::2],  # non-contiguous
        "mask": np.array([True, False]),
        "names": np.array(["ab", "c"]),
        "step": np.int64(3),
        "scale": np.float32(0.5),
        "nested": [{"x": np.zeros((0, 3), np.int16)}, "text", b"bytes", None, 1.5],
    }
    decoded = unpackb(packb(message))
    for key in ("image", "state", "mask", "names"):
        np.testing.assert_array_equal(decoded[key], message[key])
        assert decoded[key].dtype == message[key].dtype
    assert not decoded["image"].flags.writeable
    assert decoded["step"] == 3 and decoded["step"].dtype == np.int64 and decoded["scale"].dtype == np.float32
    assert decoded["nested"][0]["x"].shape == (0, 3) and decoded["nested"][1:] == ["text", b"bytes", None, 1.5]

    for bad in (np.zeros(2, np.complex64), np.array([{}], dtype=object), np.zeros(2, dtype="i4,i4")):
        with pytest.raises(ValueError, match="not supported|cannot pack"):
            packb(bad)

    def frame(dtype, shape, data):
        return packb({"obs": {"img": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}}})

    for crafted, match in [
        (frame("|O", [1], b"\0" * 8), "obs.img: object dtype"),
        (frame("|V8", [1], b"\0" * 8), "obs.img: void"),
        (frame("<c8", [1], b"\0" * 8), "obs.img: complex"),
        (frame("<f4", [3], b"\0" * 8), r"obs.img: shape \[3\] of dtype <f4 needs 12 bytes, got 8"),
        (frame("<f4", [-1], b""), "obs.img: array shape"),
        (frame("<f8", [0, 2**63], b""), r"obs.img: array shape \[0, 9223372036854775808\] is beyond numpy's limits"),
        (frame("<f8", [0] * 65, b""), r"obs.img: array shape \[0, 0, .*\] is beyond numpy's limits \(.*found 65\)"),
        (frame("nonsense", [1], b"\0"), "obs.img: unknown dtype"),
        (frame("|u1", [2000], b"\0" * 2000), "obs.img: array of 2000 bytes exceeds the limit of 1000"),
        (b"\xc1", "frame: not a valid msgpack message"),
    ]:
        with pytest.raises(ValueError, match=match):
            unpackb(crafted, max_array_bytes=1000)

    scalars = [np.bool_(True), np.int8(-3), np.uint16(7), np.float32(0.25)]  # (float64, str_, bytes_ pack natively)
    for scalar in scalars:
        decoded = unpackb(packb({"x": scalar}))["x"]
        assert decoded == scalar and decoded.dtype == scalar.dtype

    def scalar_frame(dtype, data):
        return packb({"obs": {"x": {b"__npgeneric__": True, b"data": data, b"dtype": dtype}}})

    for dtype, data, got in [("<f4", "1.5", "str '1.5'"), ("<i4", 1.9, "float 1.9"), ("<f8", None, "NoneType"),
                             ("|b1", "False", "str"), ("<i8", True, "bool"), ("<f4", [1, 2], "list")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"obs\.x: a numpy .* scalar's value must be .*, got {re.escape(got)}"):
            unpackb(scalar_frame(dtype, data))

    nested = {"ok": 1}
    for _ in range(MAX_DEPTH):
        nested = {"a": nested}
    with pytest.raises(ValueError, match=rf"^a(\.a)*: nested deeper than {MAX_DEPTH} levels"):
        unpackb(packb(nested))
    assert unpackb(packb(nested["a"])) == nested["a"]

    # a frame of empty maps (one byte each on the wire, ~70 in Python) is refused before it grows, not decoded
    flood = msgpack.packb([{}] * (MAX_CONTAINERS + 1))
    with pytest.raises(ValueError, match=rf"frame: more than {MAX_CONTAINERS} maps and lists"):
        unpackb(flood)
    image = np.arange(224 * 224 * 3, dtype=np.uint8).reshape(224, 224, 3)
    assert np.array_equal(unpackb(packb({"image": image.tolist()}))["image"], image)  # nested lists still pass


def test_msgpack_numpy_matches_openpi_client_bytes():
    openpi_msgpack = pytest.importorskip("openpi_client.msgpack_numpy")
    message = {"observation/image": np.ones((4, 4, 3), np.uint8), "prompt": "hi", "step": np.int64(2)}
    ours = packb(message)
    assert ours == openpi_msgpack.Packer().pack(message)
    theirs = openpi_msgpack.unpackb(ours)
    np.testing.assert_array_equal(theirs["observation/image"], message["observation/image"])


# ---------------------------------------------------------------- protocol


def test_metadata_frame(server, policy):
    with client_for(server) as client:
        meta = client.metadata
    assert meta["action_chunk_size"] == meta["action_horizon"] == 4
    assert (meta["action_dim"], meta["state_dim"]) == (7, 6)
    assert meta["cameras"] == list(CAMERAS) and meta["model_type"] == policy.model.config.model_type
    assert meta["available_unnorm_keys"] == ["bridge", "other"] and meta["default_unnorm_key"] == "bridge"
    assert meta["training_obs_image_size"] == [56, 56]
    assert meta["batching"]["enabled"] and meta["limits"]["max_array_bytes"] == 100_000


def test_openpi_forms_match_in_process_predict(server, policy):
    obs, batched = make_obs(0), make_obs(1, batch=3)
    flat = {f"observation/{c}": obs["images"][c] for c in CAMERAS}
    forms = [
        (obs, obs, None),
        ({**flat, "prompt": obs["instruction"], "observation/state": obs["state"], "step": np.int64(5)}, obs, None),
        ({**obs["images"], "prompt": obs["instruction"], "state": obs["state"]}, obs, None),
        ({**{f"observation.images.{c}": obs["images"][c] for c in CAMERAS}, "instruction": obs["instruction"],
          "observation.state": obs["state"]}, obs, None),
        ({**obs, "unnorm_key": "other"}, obs, "other"),
        (batched, batched, None),
    ]
    with client_for(server) as client:
        for sent, reference, key in forms:
            reply = client.infer(sent)
            expected = policy.predict(reference, unnorm_key=key or "bridge")
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == expected.shape
            np.testing.assert_allclose(reply["actions"], expected, atol=1e-5)
            assert reply["server_timing"]["infer_ms"] > 0
        assert "prev_total_ms" in reply["server_timing"]
    other = policy.predict(obs, unnorm_key="other")
    assert not np.allclose(other, policy.predict(obs, unnorm_key="bridge"))


@OPENPI_CONNECT_WARNING
def test_real_openpi_client_round_trip(server, policy):
    websocket_policy = pytest.importorskip("openpi_client.websocket_client_policy")
    client = websocket_policy.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    try:
        assert client.get_server_metadata()["action_chunk_size"] == 4
        for seed in (2, 3):
            obs = make_obs(seed)
            sent = {f"observation/{c}": obs["images"][c] for c in CAMERAS}
            sent.update({"observation/state": obs["state"], "prompt": obs["instruction"]})
            reply = client.infer(sent)
            np.testing.assert_allclose(reply["actions"], policy.predict(obs), atol=1e-5)
        # errors come as a text frame, as openpi's own server sends them, so its client raises them readably
        with pytest.raises(RuntimeError, match="Error in inference server:\nimages.primary: missing"):
            client.infer({"prompt": "no images"})
        assert client.infer(sent)["actions"].shape == (4, 7)  # the connection stays open
    finally:
        client._ws.close()


@OPENPI_CONNECT_WARNING
def test_openpi_libero_example_client_keys_reach_the_primary_and_wrist_cameras(server, policy):
    """openpi's examples/libero/main.py, unchanged: 180°-rotated frames resized with padding by openpi-client's
    image_tools, sent as `observation/image` and `observation/wrist_image` with a float64 state."""
    websocket_policy = pytest.importorskip("openpi_client.websocket_client_policy")
    from openpi_client import image_tools

    rng = np.random.default_rng(8)
    agentview, wrist = (rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(2))
    img, wrist_img = (image_tools.convert_to_uint8(image_tools.resize_with_pad(np.ascontiguousarray(frame[::-1, ::-1]),
                                                                               48, 48))
                      for frame in (agentview, wrist))  # fmt: skip
    state = rng.normal(size=6)
    element = {"observation/image": img, "observation/wrist_image": wrist_img, "observation/state": state,
               "prompt": "put the bowl on the plate"}  # fmt: skip
    expected = policy.predict({"images": {"primary": img, "wrist": wrist_img}, "instruction": element["prompt"],
                               "state": state.astype(np.float32)})  # fmt: skip
    swapped = policy.predict({"images": {"primary": wrist_img, "wrist": img}, "instruction": element["prompt"],
                              "state": state.astype(np.float32)})  # fmt: skip
    assert np.abs(expected - swapped).max() > 1e-4  # the cameras are told apart
    client = websocket_policy.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    try:
        np.testing.assert_allclose(client.infer(element)["actions"], expected, atol=1e-5)
        with pytest.raises(RuntimeError, match="observation/primary, observation/image: the same field"):
            client.infer({**element, "observation/primary": img})
    finally:
        client._ws.close()


def test_prompts_sent_as_numpy_strings(server, policy):
    obs, batched = make_obs(11), make_obs(12, batch=2)
    with client_for(server) as client:
        reply = client.infer({**obs, "instruction": np.asarray(obs["instruction"])})  # a 0-d <U array
        np.testing.assert_allclose(reply["actions"], policy.predict(obs), atol=1e-5)
        reply = client.infer({**batched, "instruction": np.array(batched["instruction"])})
        np.testing.assert_allclose(reply["actions"], policy.predict(batched), atol=1e-5)
        with pytest.raises(ServerError, match=r"instruction: expected a string or 2 string\(s\), got array\(\[b'a'"):
            client.infer({**batched, "instruction": np.array([b"a", b"b"])})


@OPENPI_CONNECT_WARNING
def test_channels_first_images_as_openpi_aloha_clients_send_them(server, policy):
    """openpi's ALOHA examples send `np.transpose(img, (2, 0, 1))`: [3, H, W] (non-contiguous; packed in C order)."""
    websocket_policy = pytest.importorskip("openpi_client.websocket_client_policy")
    obs, batched = make_obs(9), make_obs(10, batch=2)
    chw = {c: np.transpose(view, (2, 0, 1)) for c, view in obs["images"].items()}
    batched_chw = {c: np.transpose(views, (0, 3, 1, 2)) for c, views in batched["images"].items()}
    client = websocket_policy.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    try:
        reply = client.infer({"images": chw, "prompt": obs["instruction"], "state": obs["state"]})
        np.testing.assert_allclose(reply["actions"], policy.predict(obs), atol=1e-5)
        reply = client.infer({**batched, "images": batched_chw})
        np.testing.assert_allclose(reply["actions"], policy.predict(batched), atol=1e-5)
        with pytest.raises(RuntimeError, match=r"images.wrist: expected shape \[H, W, 3\] or \[B, H, W, 3\] \(or "
                                               r"channels first\), got \[4, 48, 48\]"):  # fmt: skip
            client.infer({**obs, "images": {**chw, "wrist": np.zeros((4, 48, 48), np.uint8)}})
    finally:
        client._ws.close()
    from hf_vla.serving.protocol import RequestParser

    parser = RequestParser(policy.processor, "bridge", Limits())
    square = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)  # ambiguous: read as [H, W, 3], never transposed
    views = parser.openpi({"images": {"primary": square, "wrist": square}, "prompt": "go", "state": obs["state"]})
    assert np.array_equal(views.rows[0].views[0], square)


def test_openpi_camera_aliases_never_take_another_cameras_own_name():
    from hf_vla.serving.protocol import RequestParser

    def parser(cameras):
        processor = SimpleNamespace(camera_names=cameras, state_dim=0, check_instruction=lambda *args: None,
                                    embodiment_dims=lambda key: (7, 0), embodiment_action_mode=lambda key: "abs",
                                    norm_stats={"k": {}})  # fmt: skip
        return RequestParser(processor, default_unnorm_key=None, limits=Limits())

    a, b = np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)
    for cameras, sent, expected in [
        (["primary", "image"], {"observation/primary": a, "observation/image": b}, (a, b)),
        (["wrist", "wrist_image"], {"observation/wrist": a, "observation/wrist_image": b}, (a, b)),
        (["front", "wrist"], {"observation/front": a, "observation/wrist_image": b}, (a, b)),
    ]:
        views = parser(cameras).openpi({**sent, "prompt": "go"}).rows[0].views
        assert [np.shares_memory(v, e) for v, e in zip(views, expected)] == [True, True], cameras
    with pytest.raises(ValueError, match=r"^images.front: missing; .* \['front', 'observation/front', "
                                         r"'observation/images/front', 'observation.images.front', "
                                         r"'observation/front_image'\]"):  # no `image` for a camera not primary
        parser(["front", "wrist"]).openpi({"observation/image": a, "observation/wrist_image": b, "prompt": "go"})


@OPENPI_CONNECT_WARNING
def test_an_array_that_does_not_decode_is_an_error_in_its_requests_form(server, policy):
    """An array over max_array_bytes (or of a refused dtype) fails before the request is read; its error still
    comes in the request's form, so openpi-client raises it (a binary {"error"} map it would return as a reply)."""
    websocket_policy = pytest.importorskip("openpi_client.websocket_client_policy")
    obs = make_obs(7)
    big = np.zeros((200, 200, 3), np.uint8)  # 120,000 bytes > the fixture's max_array_bytes
    client = websocket_policy.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    try:
        with pytest.raises(RuntimeError, match=r"Error in inference server:\nobservation/primary: array of 120000 "
                                               r"bytes exceeds the limit of 100000 bytes"):  # fmt: skip
            client.infer({"observation/primary": big, "observation/wrist": obs["images"]["wrist"],
                          "observation/state": obs["state"], "prompt": obs["instruction"]})  # fmt: skip
        np.testing.assert_allclose(client.infer({**obs["images"], "prompt": obs["instruction"],
                                                 "state": obs["state"]})["actions"], policy.predict(obs), atol=1e-5)
    finally:
        client._ws.close()
    example = {"image": [big, obs["images"]["wrist"]], "lang": obs["instruction"], "state": obs["state"]}
    refused = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}
    with client_for(server) as ours:
        for request, message in [
            ({"type": "infer", "request_id": "r7", "payload": {"examples": [example]}},
             "payload.examples[0].image[0]: array of 120000 bytes exceeds the limit of 100000 bytes"),
            ({"request_id": "r8", "batch_images": [[refused, refused]], "instructions": ["go"]},
             "batch_images[0][0]: object dtype '|O' is not supported"),
        ]:  # fmt: skip
            reply = ours.request(request)
            assert (reply["status"], reply["ok"], reply["request_id"]) == ("error", False, request["request_id"])
            assert reply["error"]["message"] == message


def test_starvla_request_shapes(server, policy):
    obs = make_obs(4, batch=2)
    examples = [
        {"image": [obs["images"][c][b] for c in CAMERAS], "lang": obs["instruction"][b], "state": obs["state"][b]}
        for b in range(2)
    ]
    expected = policy.predict(obs, unnorm_key="other")
    with client_for(server) as client:
        reply = client.request({"type": "infer", "request_id": "r1", "payload": {"examples": examples,
                                                                                 "unnorm_key": "other"}})
        assert (reply["status"], reply["ok"], reply["type"], reply["request_id"]) == ("ok", True,
                                                                                      "inference_result", "r1")
        np.testing.assert_allclose(reply["data"]["actions"], expected, atol=1e-5)
        _, normalized = policy.predict(obs, unnorm_key="other", return_normalized=True)
        np.testing.assert_allclose(reply["data"]["normalized_actions"], normalized, atol=1e-5)
        flat = client.request({"type": "predict_action", "examples": examples[:1], "unnorm_key": "other",
                               "do_sample": False})
        np.testing.assert_allclose(flat["data"]["actions"], expected[:1], atol=1e-5)
        assert client.request({"type": "ping", "request_id": 9}) == {"status": "ok", "ok": True, "type": "ping",
                                                                     "request_id": 9}
        error = client.request({"type": "infer", "request_id": "r2", "payload": {"examples": [{"lang": "x"}]}})
        assert (error["status"], error["ok"], error["request_id"]) == ("error", False, "r2")
        assert error["error"]["message"].startswith("payload.examples[0].image:")
        two_states = {**examples[0], "state": obs["state"][:, :3]}  # [2, 3]: 6 values, but not one sample's state
        error = client.request({"type": "infer", "payload": {"examples": [two_states]}})
        assert error["error"]["message"] == "payload.examples[0].state: expected [S] or [1, S] for one example, got [2, 3]"
        assert "unknown request type" in client.request({"type": "train"})["error"]["message"]
        # the 2025 form: a [B, 1, S] state, as StarVLA's frameworks took it, as an array or as nested lists
        batch_images = [example["image"] for example in examples]
        for state in (obs["state"][:, None], obs["state"][:, None].tolist()):
            legacy = client.request({"batch_images": batch_images, "instructions": obs["instruction"],
                                     "state": state, "unnorm_key": "other"})  # fmt: skip
            np.testing.assert_allclose(legacy["data"]["actions"], expected, atol=1e-5)


@OPENPI_CONNECT_WARNING
def test_healthz_and_api_key(policy):
    key = "s3cret"
    with PolicyServer(policy, port=0, api_key=key) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"OK\n")
        conn.close()

        obs = make_obs(5)
        with client_for(server, api_key=key) as client:  # Authorization: Bearer
            assert client.infer(obs)["actions"].shape == (4, 7)
        uri = f"ws://127.0.0.1:{server.port}"
        with connect(uri, additional_headers={"x-api-key": key}, open_timeout=TIMEOUT) as ws:
            assert "action_dim" in unpackb(ws.recv(timeout=TIMEOUT))
        for headers in (None, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            with pytest.raises(InvalidStatus) as excinfo:
                connect(uri, additional_headers=headers, open_timeout=TIMEOUT)
            assert excinfo.value.response.status_code == 401
        try:
            from openpi_client.websocket_client_policy import WebsocketClientPolicy
        except ImportError:
            return
        client = WebsocketClientPolicy("127.0.0.1", server.port, api_key=key)  # Authorization: Api-Key
        assert client.infer({**obs["images"], "prompt": obs["instruction"], "state": obs["state"]})["actions"].shape \
            == (4, 7)
        client._ws.close()


def test_an_api_key_header_sent_twice_is_checked_not_a_server_error(policy):
    with PolicyServer(policy, port=0, api_key="s3cret") as server:
        uri = f"ws://127.0.0.1:{server.port}"
        for headers in ([("x-api-key", "wrong"), ("x-api-key", "other")],
                        [("Authorization", "Bearer wrong"), ("Authorization", "Api-Key other")]):  # fmt: skip
            with pytest.raises(InvalidStatus) as excinfo:
                connect(uri, additional_headers=headers, open_timeout=TIMEOUT)
            assert excinfo.value.response.status_code == 401  # was 500: `headers.get` raised MultipleValuesError
        for headers in ([("x-api-key", "wrong"), ("x-api-key", "s3cret")],
                        [("Authorization", "Basic dXNlcg=="), ("Authorization", "Bearer s3cret")]):  # fmt: skip
            with connect(uri, additional_headers=headers, open_timeout=TIMEOUT) as ws:
                assert unpackb(ws.recv(timeout=TIMEOUT))["action_dim"] == 7


# ---------------------------------------------------------------- robustness


def test_malformed_frames_get_error_replies_and_the_connection_keeps_serving(server, policy):
    good = make_obs(6)
    image = good["images"]["primary"]
    cases = [
        (b"\x92\x01\x02", "message: expected a map, got list"),
        (b"\xc1\xc1garbage", "frame: not a valid msgpack message"),
        ("a text frame", "frame: text frames are not accepted"),
        (packb({"prompt": "no images"}), "images.primary: missing"),
        (packb({"images": [image]}), "images: expected a map"),
        (packb({**good, "images": {"primary": image}}), "images.wrist: missing"),
        (packb({**good, "images": {**good["images"], "top": image}}), "images: unknown camera(s) ['top']"),
        (packb({**good, "images": {**good["images"], "wrist": image.astype(np.float32)}}),
         "images.wrist: expected dtype uint8"),
        (packb({**good, "images": {**good["images"], "wrist": image[..., 0]}}), "images.wrist: expected shape"),
        (packb({**good, "images": {**good["images"], "wrist": image[None]}}), "images: mix of batched"),
        (packb({**good, "images": {**good["images"], "wrist": "pixels"}}), "images.wrist: expected a uint8 numpy"),
        (packb({**good, "instruction": 42}), "instruction: expected a string"),
        (packb({"images": good["images"]}), "prompt: missing"),
        (packb({**good, "state": np.zeros(3, np.float32)}), "state: expected 6 values"),
        (packb({**good, "state": np.array([np.nan] * 6)}), "state: contains NaN"),
        (packb({**good, "state": np.array(["a"] * 6)}), "state: expected a numeric array, got dtype <U1"),
        (packb({**good, "state": ["1.0"] * 6}), "state: expected a numeric array, got dtype <U3"),  # never parsed
        (packb({**good, "state": [True] * 6}), "state: expected numbers, got booleans among them"),
        (packb({**good, "state": [True, 0.5, 0, 0, 0, 0]}), "state: expected numbers, got booleans"),
        (packb({**good, "images": {c: np.zeros((0, 8, 8, 3), np.uint8) for c in CAMERAS}, "instruction": []}),
         "images: expected at least one sample, got 0"),
        (packb({**good, "unnorm_key": "mars"}), "unnorm_key: unknown key 'mars'"),
        (packb({**good, "images": {c: np.zeros((200, 200, 3), np.uint8) for c in CAMERAS}}),
         "images.primary: array of 120000 bytes exceeds the limit of 100000"),
        (packb({"images": {c: np.zeros((9, 8, 8, 3), np.uint8) for c in CAMERAS}, "prompt": "x"}),
         "images: 9 samples exceed the server's max_request_rows=8"),
        (packb({"images": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}}),
         "images: object dtype"),
        (packb({**good, "state": {b"__ndarray__": True, b"data": b"", b"dtype": "<f8", b"shape": [0, 2**63]}}),
         "state: array shape [0, 9223372036854775808] is beyond numpy's limits"),
        (packb({**good, "instruction": "pick <|image_pad|>"}), "instruction: the instruction may not contain the "
                                                              "reserved token '<|image_pad|>'"),
        (packb({**make_obs(6, batch=3), "instruction": ["a", "b", "c <|im_end|>"]}), "instruction[2]: the "
                                                                                 "instruction may not contain"),
        (packb({**good, "state": np.array([1e300] + [0.0] * 5)}), "state: values beyond float32's range"),
        (packb({k: v for k, v in good.items() if k != "state"}), "state: missing; this model takes a state of 6 "
                                                                 "values (as state, observation/state or observation.state)"),
        (packb({"type": "infer", "examples": [{"image": [image, image], "lang": "go"}]}),
         "examples[0].state: missing; this model takes a state of 6 values"),
        (packb({"type": "infer", "batch_images": [[image, image]], "instructions": ["go"]}),
         "state: missing; this model takes a state of 6 values"),
        # one field under two names: which the client meant would be a guess
        (packb({**good, "prompt": "stop"}), "instruction, prompt: the same field sent under several names"),
        (packb({**good, "observation/state": good["state"]}), "state, observation/state: the same field"),
        (packb({**good, "observation/wrist": image}), "images: sent both as an `images` map and as "
                                                      "['observation/wrist']"),
        (packb({"primary": image, "observation.images.primary": image, "wrist": image, "prompt": "go",
                "state": good["state"]}), "primary, observation.images.primary: the same field"),
        (packb({"type": "infer", "examples": [{"image": [image, image], "lang": "go", "prompt": "stop",
                                               "state": good["state"]}]}),
         "examples[0].lang, examples[0].prompt: the same field sent under several names"),
        (packb({"type": "infer", "payload": {"examples": [{"image": [image, image], "lang": "go",
                                                           "state": good["state"]}]}, "unnorm_key": "other"}),
         "['unnorm_key']: sent beside `payload`, which holds the request"),
    ]
    unreadable = ("message: expected a map", "frame:")  # not a map: its form is unknown
    expected = policy.predict(good)
    with client_for(server) as client:
        for frame, message in cases:
            reply = client.send_frame(frame)
            if message.startswith(unreadable):
                assert message in reply["error"], (message, reply)  # a binary {"error": ...} map
            elif isinstance(reply, dict) and reply.get("status") == "error":  # StarVLA form
                assert message in reply["error"]["message"], (message, reply)
            else:
                assert isinstance(reply, str) and message in reply, (message, reply)  # openpi form: a text frame
            np.testing.assert_allclose(client.infer(good)["actions"], expected, atol=1e-5)
        with pytest.raises(ServerError, match="prompt: missing"):
            client.infer({"images": good["images"]})

    # A frame over max_frame_bytes is refused by websockets (close 1009); the server keeps serving.
    with client_for(server) as client:
        with pytest.raises(ConnectionClosed) as excinfo:
            client.send_frame(b"\0" * 1_100_000)
        assert excinfo.value.rcvd.code == 1009
    with client_for(server) as client:
        np.testing.assert_allclose(client.infer(good)["actions"], expected, atol=1e-5)


def test_frames_sent_back_to_back_are_answered_one_each_in_order(server, policy):
    """A client that sends several frames without waiting (good, bad, StarVLA-form, ping, good) gets one reply per
    frame, in the order sent, each one its own frame's."""
    first, second, third = make_obs(41), make_obs(42), make_obs(43)
    example = {"image": [second["images"][c] for c in CAMERAS], "lang": second["instruction"],
               "state": second["state"]}  # fmt: skip
    frames = [packb(first), packb({"prompt": "no images"}), packb({"type": "infer", "request_id": 7,
              "payload": {"examples": [example], "unnorm_key": "other"}}), packb({"type": "ping", "request_id": 8}),
              packb(third)]  # fmt: skip
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
        unpackb(ws.recv(timeout=TIMEOUT))  # metadata
        for frame in frames:
            ws.send(frame)
        replies = [ws.recv(timeout=TIMEOUT) for _ in frames]
    replies = [reply if isinstance(reply, str) else unpackb(reply) for reply in replies]
    np.testing.assert_allclose(replies[0]["actions"], policy.predict(first), atol=1e-5)
    assert isinstance(replies[1], str) and replies[1].startswith("images.primary: missing")
    assert replies[2]["request_id"] == 7 and replies[2]["type"] == "inference_result"
    np.testing.assert_allclose(replies[2]["data"]["actions"], policy.predict(second, unnorm_key="other")[None],
                               atol=1e-5)  # fmt: skip
    assert replies[3] == {"status": "ok", "ok": True, "type": "ping", "request_id": 8}
    np.testing.assert_allclose(replies[4]["actions"], policy.predict(third), atol=1e-5)


# ---------------------------------------------------------------- micro-batching


def run_clients(server, requests_per_client):
    """One thread and connection per client; all clients send round r together. Returns replies per client."""
    n = len(requests_per_client)
    barrier, replies, failures = threading.Barrier(n, timeout=TIMEOUT), [[] for _ in range(n)], []

    def work(i):
        try:
            with client_for(server) as client:
                for request in requests_per_client[i]:
                    barrier.wait()
                    replies[i].append(client.request(request))
        except Exception as error:  # re-raised in the main thread
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert not failures, failures
    return replies


def test_concurrent_clients_get_their_own_rows_and_requests_are_batched(server, policy):
    rounds = 3
    requests, expected = [], []
    for i in range(8):
        obs_list = [make_obs(100 + 10 * i + r, batch=2 if i == 7 else None, size=40 if i == 6 else 48)
                    for r in range(rounds)]
        key = "other" if i == 5 else "bridge"
        requests.append([{**obs, "unnorm_key": key} for obs in obs_list])
        expected.append([policy.predict(obs, unnorm_key=key) for obs in obs_list])
    flat = [chunk for row in expected for e in row for chunk in e.reshape(-1, 4, 7)]
    assert min(np.abs(a - b).max() for k, a in enumerate(flat) for b in flat[k + 1:]) > 1e-4  # mixing would show

    before = server.stats
    replies = run_clients(server, requests)
    after = server.stats
    for i in range(8):
        for r in range(rounds):
            np.testing.assert_allclose(replies[i][r]["actions"], expected[i][r], atol=1e-5, err_msg=f"client {i}")
    assert after["requests"] - before["requests"] == 8 * rounds
    assert after["batched_calls"] > before["batched_calls"]
    assert after["predict_calls"] - before["predict_calls"] < 8 * rounds
    assert after["largest_batch"] >= 4


def test_concurrent_batched_starvla_requests_get_their_own_rows_in_both_units(server, policy):
    """Two StarVLA clients at once, each a 2-sample request (one in the 2025 `batch_images` form, one configured to
    execute 2 steps): each gets its own rows, `actions` in robot units and `normalized_actions` the model's output,
    both cut to that connection's execute_steps."""
    first, second = make_obs(20, batch=2), make_obs(21, batch=2)
    views = [[obs["images"][c][b] for c in CAMERAS] for obs in (first, second) for b in range(2)]
    legacy = {"request_id": "a", "batch_images": views[:2], "instructions": first["instruction"],
              "state": first["state"][:, None]}  # fmt: skip
    examples = {"type": "infer", "request_id": "b", "payload": {"examples": [
        {"image": views[2 + b], "lang": second["instruction"][b], "state": second["state"][b]} for b in range(2)]}}
    replies = run_clients(server, [[{"type": "ping"}, legacy], [{"type": "configure", "execute_steps": 2}, examples]])
    assert replies[1][0]["action_chunk_size"] == 2
    for (_, reply), obs, steps, request_id in ((replies[0], first, 4, "a"), (replies[1], second, 2, "b")):
        actions, normalized = policy.predict(obs, return_normalized=True)
        assert (reply["type"], reply["request_id"]) == ("inference_result", request_id)
        assert reply["data"]["actions"].shape == reply["data"]["normalized_actions"].shape == (2, steps, 7)
        np.testing.assert_allclose(reply["data"]["actions"], actions[:, :steps], atol=1e-5)
        np.testing.assert_allclose(reply["data"]["normalized_actions"], normalized[:, :steps], atol=1e-5)
        assert not np.allclose(reply["data"]["actions"], reply["data"]["normalized_actions"], atol=1e-2)


def test_a_failing_sample_does_not_fail_its_batch_mates(server, policy, monkeypatch):
    # a sample that passes the request checks but fails inside predict (the batch is retried one row at a time)
    predict = policy.predict

    def predict_failing_on_one_row(obs, **kwargs):
        if "fails in predict" in obs["instruction"]:
            raise ValueError("text[0]: this sample fails in predict")
        return predict(obs, **kwargs)

    monkeypatch.setattr(policy, "predict", predict_failing_on_one_row)
    good = [make_obs(200 + i) for i in range(3)]
    bad = make_obs(203, prompt="fails in predict")
    before = server.stats["fallbacks"]
    for _ in range(5):  # until the bad request shares a batch (a loaded machine can make the clients miss the window)
        replies = run_clients(server, [[obs] for obs in good] + [[bad]])
        for obs, (reply,) in zip(good, replies):
            np.testing.assert_allclose(reply["actions"], predict(obs), atol=1e-5)
        assert replies[3][0] == "text[0]: this sample fails in predict"
        if server.stats["fallbacks"] > before:
            break
    assert server.stats["fallbacks"] > before


def test_a_chunk_that_did_not_decode_is_an_error_reply_not_nan_actions(server, policy, monkeypatch):
    # FAST marks a chunk it cannot decode with NaN; a robot client must get an error, and batch mates their actions
    predict = policy.predict

    def predict_with_an_undecodable_row(obs, **kwargs):
        actions, normalized = predict(obs, **kwargs)
        rows = [i for i, text in enumerate(obs["instruction"]) if text.startswith("undecodable")]
        actions[rows], normalized[rows] = np.nan, np.nan
        return actions, normalized

    monkeypatch.setattr(policy, "predict", predict_with_an_undecodable_row)
    good = [make_obs(300 + i) for i in range(2)]
    bad = make_obs(302, prompt="undecodable chunk")
    replies = run_clients(server, [[obs] for obs in good] + [[bad]])
    for obs, (reply,) in zip(good, replies):
        np.testing.assert_allclose(reply["actions"], predict(obs), atol=1e-5)
    assert isinstance(replies[2][0], str) and "sample(s) [0] is not a valid action chunk" in replies[2][0]
    # the evaluation client ends such an episode as a failure instead of the whole evaluation
    from hf_vla.sim.evaluation import ServerPolicy, UndecodableChunk

    remote = ServerPolicy(f"ws://127.0.0.1:{server.port}")
    try:
        np.testing.assert_allclose(remote(good[0]), predict(good[0]), atol=1e-5)
        with pytest.raises(UndecodableChunk, match=r"sample\(s\) \[0\] is not a valid action chunk"):
            remote(bad)
    finally:
        remote.close()


@pytest.mark.parametrize("condition_mask, state_in_prompt", [("always", False), ("never", False), ("never", True)])
def test_models_that_attend_to_padding_batch_only_prompts_of_one_length(condition_mask, state_in_prompt):
    """Unmasked padding changes a flow model's output next to a longer prompt: its batches hold one instruction
    (one request when the state text is in the prompt too); models that mask padding batch every compatible row."""
    calls = []

    def predict(obs, **kwargs):
        calls.append(list(obs["instruction"]))
        actions = np.zeros((len(obs["instruction"]), 4, 7), np.float32)
        return actions, actions

    config = SimpleNamespace(condition_mask=condition_mask, state_in_prompt=state_in_prompt)
    policy = SimpleNamespace(model=SimpleNamespace(config=config), processor=SimpleNamespace(camera_names=["primary"]),
                             predict=predict)  # fmt: skip
    batcher = MicroBatcher(policy, enabled=True, window_ms=10, max_batch=8)
    try:
        view = np.zeros((8, 8, 3), np.uint8)
        texts = ["open the drawer", "open the drawer and then close it"]  # two clients each, in parallel envs
        jobs = [[Row((view,), texts[j % 2], None, "k")] for j in range(4)]
        results = batcher._predict_jobs(jobs)
    finally:
        batcher.close()
    assert all(len(result.actions) == 1 for result in results)
    if condition_mask == "always":
        assert calls == [[texts[j % 2] for j in range(4)]]
    elif not state_in_prompt:
        assert calls == [[texts[0], texts[0]], [texts[1], texts[1]]]
    else:
        assert calls == [[texts[j % 2]] for j in range(4)]


def test_a_batch_of_other_embodiments_instructions_and_sizes_answers_each_request_as_predict_alone(tiny_vlm_dirs):
    """One collection mixing unnorm keys (an absolute one, one with relative dimensions, one a mixture padded to the
    model's widths), instructions of other lengths, image sizes and a two-row request: each request gets exactly
    its own rows of what `VLAPolicy.predict` gives for its observation alone, at its embodiment's width, and rows
    share a call only where key and sizes agree."""
    from hf_vla.data.mixture import _pad_feature_stats
    from hf_vla.normalization import compute_stats

    model, processor = make_oft(tiny_vlm_dirs["qwen2_5_vl"], action_dim=7, action_horizon=4, state_dim=6)
    rng = np.random.default_rng(5)
    processor.set_norm_stats("rel_arm", {**processor.norm_stats["bridge"], "action_mode": ["rel"] * 6 + ["abs"]})
    narrow = {"action": _pad_feature_stats(compute_stats(rng.normal(3.0, 2.0, size=(64, 4))), 7),
              "state": _pad_feature_stats(compute_stats(rng.normal(size=(64, 3))), 6),
              "action_mode": ["delta"] * 3 + ["abs"] * 4}  # relative to its own 3 state values; padding absolute
    processor.set_norm_stats("narrow", narrow)
    policy = VLAPolicy(model, processor)
    predict, calls = policy.predict, []
    policy.predict = lambda obs, **kwargs: calls.append(kwargs["unnorm_key"]) or predict(obs, **kwargs)

    def observation(seed, key, prompts, size=48, state_width=6):
        obs = make_obs(seed, batch=len(prompts), size=size)
        return {**obs, "instruction": prompts, "state": obs["state"][:, :state_width]}, key

    requests = [observation(1, "bridge", ["open"]),
                observation(2, "narrow", ["push the red button twice", "close"], state_width=3),
                observation(3, "rel_arm", ["place the blue cup on the top shelf of the drawer"]),
                observation(4, "bridge", ["pick"], size=40),
                observation(5, "bridge", ["open the drawer and then close it again"])]  # fmt: skip
    # rows as the request parser makes them: states zero-padded to the model's width
    jobs = [[Row(tuple(obs["images"][c][b] for c in CAMERAS), obs["instruction"][b],
                 np.pad(obs["state"][b], (0, 6 - obs["state"].shape[1])), key) for b in range(len(obs["instruction"]))]
            for obs, key in requests]  # fmt: skip
    batcher = MicroBatcher(policy, enabled=True, window_ms=10, max_batch=8)
    try:
        results = batcher._predict_jobs(jobs)
    finally:
        batcher.close()
    assert sorted(calls) == ["bridge", "bridge", "narrow", "rel_arm"]  # requests 0 and 4 shared a call
    assert (batcher.stats.predict_calls, batcher.stats.batched_calls, batcher.stats.rows) == (4, 1, 6)
    for (obs, key), result in zip(requests, results):
        actions, normalized = predict(obs, unnorm_key=key, return_normalized=True)
        assert actions.shape[-1] == (4 if key == "narrow" else 7) and len(result.actions) == len(actions)
        np.testing.assert_allclose(np.stack(result.actions), actions, rtol=0, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(np.stack(result.normalized), normalized, rtol=0, atol=1e-6, err_msg=key)
    assert np.abs(np.stack(results[0].actions) - np.stack(results[4].actions)).max() > 1e-3  # rows did not mix


def counting_batcher(max_batch, calls, window_ms=10_000):
    """A MicroBatcher over a stand-in policy that records each predict call's instructions and answers row b of a
    call with actions filled with float(instruction)."""

    def predict(obs, **kwargs):
        calls.append(list(obs["instruction"]))
        actions = np.stack([np.full((4, 7), float(text), np.float32) for text in obs["instruction"]])
        return actions, actions

    config = SimpleNamespace(condition_mask="always", state_in_prompt=False)
    policy = SimpleNamespace(model=SimpleNamespace(config=config), processor=SimpleNamespace(camera_names=["primary"]),
                             predict=predict)  # fmt: skip
    return MicroBatcher(policy, enabled=True, window_ms=window_ms, max_batch=max_batch)


def test_max_batch_bounds_rows_per_call_and_per_collection():
    import asyncio

    view = np.zeros((8, 8, 3), np.uint8)
    calls = []
    batcher = counting_batcher(2, calls)
    try:
        # five compatible one-row requests: predict calls of at most max_batch rows, each reply its own row
        results = batcher._predict_jobs([[Row((view,), str(j), None, "k")] for j in range(5)])
        assert calls == [["0", "1"], ["2", "3"], ["4"]]
        for j, result in enumerate(results):
            assert len(result.actions) == 1 and (result.actions[0] == j).all()
        assert [result.batch_rows for result in results] == [2, 2, 2, 2, 1]
    finally:
        batcher.close()

    async def collect(batcher, jobs):
        for rows in jobs:
            await batcher._queue.put((rows, None))
        return await batcher._collect()

    batcher = counting_batcher(4, [])
    try:
        # max_batch counts rows, not requests: three queued requests of 2 rows fill a batch of 4 with the first two
        jobs = [[Row((view,), str(2 * j + r), None, "k") for r in range(2)] for j in range(3)]
        collected = asyncio.run(collect(batcher, jobs))
        assert [rows for rows, _ in collected] == jobs[:2]
    finally:
        batcher.close()


def test_a_camera_named_image_is_its_own_alias_and_null_keys_are_absent():
    from hf_vla.serving.protocol import RequestParser

    processor = SimpleNamespace(camera_names=["image"], state_dim=0, check_instruction=lambda *args: None,
                                embodiment_dims=lambda key: (7, 0), embodiment_action_mode=lambda key: "abs",
                                norm_stats={"k": {}})  # fmt: skip
    parser = RequestParser(processor, default_unnorm_key=None, limits=Limits())
    view = np.zeros((8, 8, 3), np.uint8)
    for name in ("image", "observation/image", "observation.images.image"):  # openpi LIBERO clients send the second
        assert np.shares_memory(parser.openpi({name: view, "prompt": "go"}).rows[0].views[0], view)
    request = parser.openpi({"images": {"image": view}, "image": None, "prompt": "go", "instruction": None})
    assert request.rows[0].instruction == "go"
    with pytest.raises(ValueError, match=r"^image, observation/image: the same field sent under several names"):
        parser.openpi({"image": view, "observation/image": view, "prompt": "go"})


def test_requests_without_an_instruction_take_the_default_prompt():
    """openpi's ALOHA sim sends no prompt; its server answers with a configured default, and so does this one."""
    import argparse

    from hf_vla import VLAPolicy
    from hf_vla.defaults import default_model_dir
    from hf_vla.serving.protocol import RequestParser
    from hf_vla.serving.server import add_arguments, options_from_args

    processor = VLAPolicy.from_pretrained(default_model_dir()).processor
    view = np.zeros((8, 8, 3), np.uint8)
    parser = RequestParser(processor, None, Limits(), default_prompt="open the drawer")
    assert parser.openpi({"images": {"corner2": view}}).rows[0].instruction == "open the drawer"
    assert parser.openpi({"images": {"corner2": view}, "prompt": "close it"}).rows[0].instruction == "close it"
    with pytest.raises(ValueError, match=r"^prompt: missing; send the instruction as `prompt` or `instruction`"):
        RequestParser(processor, None, Limits()).openpi({"images": {"corner2": view}})
    with pytest.raises(ValueError, match=r"^default_prompt: the instruction may not contain the reserved token"):
        RequestParser(processor, None, Limits(), default_prompt="go<|im_end|>")
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--default-prompt", "open the drawer"])
    assert options_from_args(args)["default_prompt"] == "open the drawer"


def test_the_batcher_waits_only_for_connections_likely_to_send():
    window = 0.005
    fresh = ClientActivity(last_reply=0.0)  # metadata frame sent at t=0
    assert fresh.expected_by(deadline=0.006, now=0.001, window_s=window)
    assert not fresh.expected_by(deadline=1.005, now=1.0, window_s=window)  # connected long ago, never sent
    steady = ClientActivity(0.0)
    steady.request_arrived(0.002)  # 2 ms between a reply and its next request
    steady.replied(0.030)
    assert steady.expected_by(deadline=0.036, now=0.031, window_s=window)
    assert not steady.expected_by(deadline=0.0305, now=0.0301, window_s=window)  # not due before the deadline
    assert not steady.expected_by(deadline=10.005, now=10.0, window_s=window)  # idle for seconds
    steady.request_arrived(0.033)
    assert not steady.expected_by(deadline=0.036, now=0.034, window_s=window)  # already queued

    resetting = ClientActivity(0.0)  # 2 ms gaps, then one 5 s pause (an episode reset), then 2 ms again
    for gap in (0.002, 0.002, 0.002, 5.0, 0.002):
        resetting.request_arrived(resetting.last_reply + gap)
        resetting.replied(resetting.last_reply + gap + 0.02)
    assert resetting.think_s == pytest.approx(0.002)  # a running mean would still expect it seconds from now
    now = resetting.last_reply + 0.001
    assert resetting.expected_by(deadline=now + window, now=now, window_s=window)


def test_the_batcher_collects_only_for_connections_expected_to_send_and_stops_at_the_deadline():
    """With a 10 s window: a lone client's request (its connection pending, another idle for a minute) is taken at
    once; a connection that just got its metadata frame is waited for and its request joins the batch, and once
    every connection has sent, the collection ends. With a short window, an expected request that never comes
    ends it at the deadline."""
    import asyncio

    view = np.zeros((8, 8, 3), np.uint8)

    def job(text):
        return [Row((view,), text, None, "k")], None

    async def long_window(batcher):
        loop = asyncio.get_running_loop()
        lone, idle = ClientActivity(loop.time() - 0.01), ClientActivity(loop.time() - 60)
        idle.request_arrived(loop.time() - 59.99)
        idle.replied(loop.time() - 59.9)
        batcher.clients.update({lone, idle})
        lone.request_arrived(loop.time())
        await batcher._queue.put(job("lone"))
        alone = await asyncio.wait_for(batcher._collect(), 5)
        lone.replied(loop.time())
        fresh = ClientActivity(loop.time())  # metadata frame just sent
        batcher.clients.add(fresh)
        lone.request_arrived(loop.time())
        await batcher._queue.put(job("lone again"))
        collecting = asyncio.ensure_future(batcher._collect())
        for _ in range(10):
            await asyncio.sleep(0)
        waited = not collecting.done()
        fresh.request_arrived(loop.time())
        await batcher._queue.put(job("fresh"))
        together = await asyncio.wait_for(collecting, 5)
        return alone, waited, together

    async def short_window(batcher):
        loop = asyncio.get_running_loop()
        steady = ClientActivity(loop.time() - 0.011)
        steady.request_arrived(loop.time() - 0.01)  # sends 1 ms after each reply
        steady.replied(loop.time())
        batcher.clients.add(steady)
        await batcher._queue.put(job("first"))
        return await asyncio.wait_for(batcher._collect(), 5)

    def instructions(jobs):
        return [rows[0].instruction for rows, _ in jobs]

    batcher = counting_batcher(8, [])  # a 10 s window
    try:
        alone, waited, together = asyncio.run(long_window(batcher))
    finally:
        batcher.close()
    assert instructions(alone) == ["lone"] and waited and instructions(together) == ["lone again", "fresh"]
    batcher = counting_batcher(8, [], window_ms=30)
    try:
        assert instructions(asyncio.run(short_window(batcher))) == ["first"]
    finally:
        batcher.close()


def test_a_model_trained_on_delta_actions_returns_absolute_ones(tmp_path):
    from hf_vla.normalization import absolute_actions
    from hf_vla.testing import build_tiny_vla

    model, processor = build_tiny_vla("oft", state_dim=7)  # actions and state of one width, as delta needs
    stats = dict(processor.norm_stats["demo"], action_mode="delta")
    processor.set_norm_stats("demo", stats)
    processor.save_pretrained(tmp_path)
    assert VLAProcessor.from_pretrained(tmp_path).norm_stats["demo"]["action_mode"] == "delta"
    policy = VLAPolicy(model, processor)
    rng = np.random.default_rng(0)
    state = rng.normal(size=7).astype(np.float32)
    obs = {"images": {c: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for c in processor.camera_names},
           "instruction": "open the drawer", "state": state}  # fmt: skip
    actions, normalized = policy.predict(obs, return_normalized=True)
    deltas = processor.decode_actions(normalized)  # without the state: as the model predicts them
    np.testing.assert_allclose(actions, state + np.cumsum(deltas, axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(actions, absolute_actions(deltas, state, "delta"), rtol=1e-6)
    with pytest.raises(ValueError, match=r"state: expected finite values of shape \[S\] for actions \[4, 7\]"):
        processor.decode_actions(normalized, state=state[None])
    with pytest.raises(ValueError, match=r"state: absolute actions for \['demo'\] .* one unnorm_key at a time"):
        processor.decode_actions(normalized[None], unnorm_key=["demo"], state=state[None])
    with PolicyServer(policy, port=0) as server, client_for(server) as client:
        np.testing.assert_allclose(client.infer(obs)["actions"], actions, atol=1e-5)
        client.configure(delta_dims=[0, 1, 2])  # would add the state a second time
        with pytest.raises(ServerError, match=r"delta_dims: embodiment 'demo' was trained on 'delta' actions"):
            client.infer(obs)

    # a model that does not read the state still needs it to turn its deltas into actions
    model, processor = build_tiny_vla("oft", state_dim=0)
    processor.set_norm_stats("demo", dict(processor.norm_stats["demo"], action_mode="delta"))
    policy = VLAPolicy(model, processor)
    actions, normalized = policy.predict(obs, return_normalized=True)
    np.testing.assert_allclose(actions, state + np.cumsum(processor.decode_actions(normalized), axis=0), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    without = {k: v for k, v in obs.items() if k != "state"}
    with pytest.raises(ValueError, match=r"state: missing; embodiment 'demo' predicts 'delta' actions"):
        policy.predict(without)
    with PolicyServer(policy, port=0) as server, client_for(server) as client:
        np.testing.assert_allclose(client.infer(obs)["actions"], actions, atol=1e-5)
        with pytest.raises(ServerError, match=r"state: missing; embodiment 'demo' predicts 'delta' actions"):
            client.infer(without)
        example = {"image": [obs["images"][c] for c in processor.camera_names], "lang": obs["instruction"]}
        reply = client.request({"type": "infer", "payload": {"examples": [example]}})  # refused as it is read
        assert reply["error"]["message"].startswith("payload.examples[0].state: missing; embodiment 'demo' predicts 'delta'")
        # the evaluation's policies hand the state to a stateless model too
        from hf_vla.sim.evaluation import InProcessPolicy, ServerPolicy

        remote = ServerPolicy(f"ws://127.0.0.1:{server.port}")
        try:
            for evaluated in (InProcessPolicy(policy), remote):
                np.testing.assert_allclose(evaluated(obs), actions, atol=1e-5)
        finally:
            remote.close()


def test_a_client_that_leaves_while_queued_costs_no_prediction(policy, monkeypatch):
    predict = policy.predict

    def slow_predict(obs, **kwargs):
        time.sleep(0.4)
        return predict(obs, **kwargs)

    monkeypatch.setattr(policy, "predict", slow_predict)
    obs = make_obs(500)
    with PolicyServer(policy, port=0) as server:
        def busy_client():
            with client_for(server) as client:
                client.infer(obs)

        busy = threading.Thread(target=busy_client)
        busy.start()  # occupies the worker for 0.4 s
        time.sleep(0.1)
        for _ in range(4):  # requests that queue behind it, from clients that then leave
            with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
                ws.recv(timeout=TIMEOUT)
                ws.send(packb(obs))
        busy.join(TIMEOUT)
        time.sleep(0.6)
        with client_for(server) as client:
            np.testing.assert_allclose(client.infer(obs)["actions"], predict(obs), atol=1e-5)
        assert server.stats["rows"] == 2  # the busy client's and the last one's: none for the 4 that left


def test_batching_can_be_disabled(policy):
    obs = [make_obs(300 + i) for i in range(4)]
    with PolicyServer(policy, port=0, batching=False) as server:
        replies = run_clients(server, [[o] for o in obs])
        stats = server.stats
    for o, (reply,) in zip(obs, replies):
        np.testing.assert_allclose(reply["actions"], policy.predict(o), atol=1e-5)
    assert (stats["batched_calls"], stats["predict_calls"], stats["largest_batch"]) == (0, 4, 1)


# ---------------------------------------------------------------- post-processing


def test_post_processing_per_connection(server, policy):
    obs = make_obs(7)
    raw = policy.predict(obs)
    with client_for(server) as client:
        reply = client.configure(execute_steps=2, delta_dims=[0, 1, 2], gripper_dims=[6], gripper_threshold=0.0,
                                 gripper_low=-1.0, gripper_high=1.0)  # fmt: skip
        config = reply["post_processing"]
        assert config["execute_steps"] == 2 and config["delta_dims"] == [0, 1, 2] and reply["action_chunk_size"] == 2
        actions = client.infer(obs)["actions"]
        assert actions.shape == (2, 7)
        np.testing.assert_allclose(actions[:, :3], obs["state"][:3] + np.cumsum(raw[:2, :3], axis=0), atol=1e-5)
        np.testing.assert_allclose(actions[:, 3:6], raw[:2, 3:6], atol=1e-5)
        np.testing.assert_array_equal(actions[:, 6], np.where(raw[:2, 6] > 0, 1.0, -1.0))
        # a StarVLA-form reply on the same connection: normalized_actions, the model's own output, cut to 2 steps too
        _, normalized = policy.predict(obs, return_normalized=True)
        example = {"image": [obs["images"][c] for c in CAMERAS], "lang": obs["instruction"], "state": obs["state"]}
        data = client.request({"type": "infer", "payload": {"examples": [example]}})["data"]
        assert data["actions"].shape == data["normalized_actions"].shape == (1, 2, 7)
        np.testing.assert_allclose(data["actions"][0], actions, atol=1e-5)
        np.testing.assert_allclose(data["normalized_actions"][0], normalized[:2], atol=1e-5)

        with pytest.raises(ServerError, match="state: missing"):
            client.infer({"images": obs["images"], "prompt": obs["instruction"]})
        for options, message in [
            ({"execute_steps": 0}, "execute_steps: expected 1..4"),
            ({"gripper_dims": [9]}, "gripper_dims: indices [9] out of range"),
            ({"delta_state_dims": [0]}, "delta_state_dims: expected 3 indices"),
            ({"warp": 1}, "configure: unknown option(s) ['warp']"),
            ({"gripper_high": "yes"}, "gripper_high: expected a finite number"),
            ({"gripper_low": float("-inf")}, "gripper_low: expected a finite number, got -inf"),
            ({"gripper_threshold": float("nan")}, "gripper_threshold: expected a finite number, got nan"),
            ({"gripper_dims": np.array(6)}, "gripper_dims: expected a list of dimension indices"),
            ({"delta_dims": [6], "delta_state_dims": None}, "delta_dims: state indices [6] out of range for state_dim 6"),
        ]:
            with pytest.raises(ServerError, match=re.escape(message)):
                client.configure(**options)
        with pytest.raises(ServerError, match=re.escape("configure: options both in payload and at the top level")):
            client.infer({"type": "configure", "payload": {}, "execute_steps": 2})
        reset = client.configure(execute_steps=None, delta_dims=None, gripper_dims=None)["post_processing"]
        assert reset["execute_steps"] is None and reset["delta_dims"] == []
        np.testing.assert_allclose(client.infer(obs)["actions"], raw, atol=1e-5)
    with client_for(server) as client:  # configuration is per connection
        np.testing.assert_allclose(client.infer(obs)["actions"], raw, atol=1e-5)


def test_delta_state_dims_name_the_state_values_the_deltas_start_from():
    actions = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    state = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
    post = PostProcess().updated({"delta_dims": [0, 2], "delta_state_dims": [3, 1]})
    post.check(action_horizon=4, action_dim=3, state_dim=4)
    out = post.apply(actions, state)
    np.testing.assert_allclose(out[:, 0], 40.0 + np.cumsum(actions[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], 20.0 + np.cumsum(actions[:, 2]), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], actions[:, 1])
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--delta-dims", "0,2", "--delta-state-dims", "3,1"])
    assert options_from_args(args)["postprocess"] == PostProcess(delta_dims=(0, 2), delta_state_dims=(3, 1))


def test_server_flags_set_default_post_processing(policy):
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--port", "0", "--execute-steps", "3", "--gripper-dims", "6", "--max-batch", "4", "--no-batching"]
    )
    options = options_from_args(args)
    assert options["postprocess"] == PostProcess(execute_steps=3, gripper_dims=(6,))
    assert (options["batching"], options["max_batch"], options["host"]) == (False, 4, "127.0.0.1")
    assert options["pack_linear_weights"] is False
    assert options_from_args(add_arguments(argparse.ArgumentParser()).parse_args(["--pack-linear-weights"]))[
        "pack_linear_weights"
    ]
    obs = make_obs(8)
    loading = ("dtype", "device", "pack_linear_weights", "host", "port")
    served = {k: v for k, v in options.items() if k not in loading}
    with PolicyServer(policy, port=0, **served) as server, client_for(server) as client:
        assert client.metadata["post_processing"]["execute_steps"] == 3
        assert client.metadata["action_chunk_size"] == 3 and client.metadata["action_horizon"] == 4
        actions = client.infer(obs)["actions"]
    assert actions.shape == (3, 7) and set(np.unique(actions[:, 6])) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="execute_steps: expected 1..4"):
        PolicyServer(policy, port=0, postprocess=PostProcess(execute_steps=9))
    with pytest.raises(ValueError, match="unknown default key 'mars'"):
        PolicyServer(policy, port=0, unnorm_key="mars")
    for options, message in [(dict(max_batch=0), "max_batch: expected a positive integer, got 0"),
                             (dict(batch_window_ms=-1.0), "batch_window_ms: expected a finite number ≥ 0, got -1.0"),
                             (dict(limits=Limits(max_frame_bytes=0)), "max_frame_bytes: expected a positive limit"),
                             (dict(postprocess=PostProcess(gripper_threshold=float("nan"))),
                              "gripper_threshold: expected a finite number, got nan")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            PolicyServer(policy, port=0, **options)


# ---------------------------------------------------------------- the client

class SlowPolicy:
    """The policy, except that the instruction "slow" takes longer than the client waits."""

    def __init__(self, policy, delay):
        self.policy, self.delay = policy, delay
        self.model, self.processor, self.unnorm_key = policy.model, policy.processor, policy.unnorm_key

    def predict(self, obs, **kwargs):
        if obs["instruction"][0] == "slow":
            time.sleep(self.delay)
        return self.policy.predict(obs, **kwargs)


class GatedPolicy:
    """The policy, except that its predict signals `entered` and then waits for `release`."""

    def __init__(self, policy):
        self.policy, self.entered, self.release = policy, threading.Event(), threading.Event()
        self.model, self.processor, self.unnorm_key = policy.model, policy.processor, policy.unnorm_key

    def predict(self, obs, **kwargs):
        self.entered.set()
        assert self.release.wait(TIMEOUT)
        return self.policy.predict(obs, **kwargs)


def test_stopping_closes_every_connection_at_once_and_frees_the_port(policy):
    gated, obs = GatedPolicy(policy), make_obs(13)
    server = PolicyServer(gated, port=0).start()
    port, serving, stopper = server.port, server._thread, threading.Thread(target=server.stop)
    try:
        busy, idle = client_for(server), client_for(server)
        busy._ws.send(packb(obs))
        assert gated.entered.wait(TIMEOUT)
        stopper.start()  # while a prediction runs
        for client in (busy, idle):  # closed "going away" (1001) without waiting for the prediction
            with pytest.raises(ConnectionClosed) as excinfo:
                client._ws.recv(timeout=TIMEOUT)
            assert excinfo.value.rcvd.code == 1001
        assert stopper.is_alive() and not gated.release.is_set()  # stop() waits for the worker thread...
    finally:
        gated.release.set()
        if stopper.ident is None:
            server.stop()
        stopper.join(TIMEOUT)
    assert not stopper.is_alive() and not serving.is_alive()
    with PolicyServer(policy, port=port) as again, client_for(again) as client:  # ...and then the port is free
        assert again.port == port
        np.testing.assert_allclose(client.infer(obs)["actions"], policy.predict(obs), atol=1e-5)


def test_a_timed_out_request_closes_the_connection_so_its_late_reply_answers_nothing(policy):
    slow, fast = make_obs(1, batch=1, prompt="slow"), make_obs(2, batch=1, prompt="fast")
    slow["instruction"] = ["slow"]
    with PolicyServer(SlowPolicy(policy, delay=1.5), port=0, unnorm_key="bridge") as server:
        client = PolicyClient("127.0.0.1", server.port, timeout=0.5)
        with pytest.raises(TimeoutError):
            client.infer(slow)
        with pytest.raises(ConnectionClosed):
            client.infer(fast)
        with client_for(server) as fresh:
            np.testing.assert_allclose(fresh.infer(fast)["actions"], policy.predict(fast), atol=1e-5)


def test_a_client_whose_connect_fails_leaves_no_connection_open():
    from websockets.sync.server import serve

    open_connections = []

    def silent(connection):  # accepts, never sends the metadata frame
        open_connections.append(connection)
        with contextlib.suppress(ConnectionClosed):
            for _ in connection:
                pass
        open_connections.remove(connection)

    with serve(silent, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with pytest.raises(TimeoutError):
            PolicyClient("127.0.0.1", server.socket.getsockname()[1], timeout=0.3)
        deadline = time.monotonic() + TIMEOUT
        while open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not open_connections
        server.shutdown()


# ---------------------------------------------------------------- the command line

def test_hf_vla_serve_logs_the_address_it_bound(tmp_path):
    """With --port 0 the log line is the only place the port shows: a client connects to what it says."""
    import os
    import queue
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "hf_vla.cli", "serve", "--port", "0"]
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        lines = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
        reader.start()
        try:
            seen, match = [], None
            while match is None:
                try:
                    seen.append(lines.get(timeout=TIMEOUT))
                except queue.Empty:
                    pytest.fail("no address line within the timeout; stderr:\n" + "".join(seen))
                match = re.search(r"serving \S+ on ws://127\.0\.0\.1:(\d+)", seen[-1])
            with PolicyClient("127.0.0.1", int(match.group(1)), timeout=TIMEOUT) as client:
                assert client.metadata["action_chunk_size"] == 8
        finally:
            process.terminate()
            process.wait(timeout=TIMEOUT)
            reader.join(timeout=TIMEOUT)  # reads to EOF before the pipe is closed under it


def test_bad_models_ports_and_devices_are_one_line_errors_found_before_loading(monkeypatch, capsys, tmp_path):
    import torch

    import hf_vla.cli
    from hf_vla.cli import main

    def run(argv):
        with pytest.raises(SystemExit) as excinfo:
            main(argv)
        assert excinfo.value.code == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error
        return error.strip().splitlines()[-1]

    offline = "We couldn't connect to 'https://huggingface.co' to load the files"
    assert run(["demo", "--model", "no-such-model"]).startswith(
        f"hf-vla demo: --model: cannot load 'no-such-model': {offline}")
    assert run(["serve", "no-such-model"]).startswith(f"hf-vla serve: MODEL: cannot load 'no-such-model': {offline}")
    assert run(["serve", "/nonexistent/model"]) == "hf-vla serve: MODEL: no such directory '/nonexistent/model'"
    assert run(["serve", "--model", "./missing"]) == "hf-vla serve: --model: no such directory './missing'"
    # a relative path: not a hub id when it has two slashes; else the Hub's error says no local directory matched
    assert run(["demo", "--model", "outputs/run/checkpoint-9"]) == (
        "hf-vla demo: --model: no such directory 'outputs/run/checkpoint-9'")
    assert run(["demo", "--model", "outputs/missing"]).endswith(
        f"(nor is it a local directory under {str(Path.cwd())!r})")
    not_a_model = tmp_path / "lerobot_dataset"  # a directory that holds no saved model
    (not_a_model / "meta").mkdir(parents=True)
    assert run(["serve", str(not_a_model)]) == (
        f"hf-vla serve: MODEL: {str(not_a_model)!r} is a directory without config.json, not a saved model")
    (not_a_model / "meta" / "info.json").write_text("{}")
    assert run(["serve", str(not_a_model / "meta" / "info.json")]) == (
        f"hf-vla serve: MODEL: {str(not_a_model / 'meta' / 'info.json')!r} is a file; expected a model directory or a "
        "hub id")
    from hf_vla.defaults import default_model_dir

    monkeypatch.setenv("HOME", str(tmp_path))  # "~/model" is a path under the home directory, not a hub id
    (tmp_path / "model").symlink_to(default_model_dir())
    assert hf_vla.cli.load_policy("~/model").processor.action_dim == 4

    monkeypatch.setattr(hf_vla.cli, "load_policy", lambda *a, **k: pytest.fail("refused before loading the model"))
    if torch.cuda.is_available():  # a device this machine lacks
        no_device = "cuda:99"
        missing = f"expected a cuda index below {torch.cuda.device_count()} (the devices this machine has), got 'cuda:99'"
    else:
        no_device, missing = "cuda", "expected a device this machine has, got 'cuda' (torch finds no cuda device)"
    for argv, message in [(["--port", "99999"], "argument --port: expected 0..65535 (0: any free port), got 99999"),
                          (["--port", "-5"], "argument --port: expected 0..65535 (0: any free port), got -5"),
                          (["--port", "80a"], "argument --port: expected an integer 0..65535, got '80a'"),
                          (["--device", "bogus"], "argument --device: expected a torch device such as cpu, cuda or "
                                                  "cuda:1, got 'bogus'"),
                          (["--device", no_device], f"argument --device: {missing}")]:
        assert run(["serve", *argv]) == f"hf-vla serve: error: {message}"
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--port", "0", "--device", "cpu"])
    assert (args.port, args.device) == (0, "cpu")


def test_other_commands_work_without_the_serve_extra(monkeypatch, capsys):
    import sys

    from hf_vla.cli import main

    for name in [m for m in sys.modules if m == "hf_vla.serving" or m.startswith("hf_vla.serving.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "websockets", None)  # as if `pip install hf_vla` without [serve]
    assert main(["demo"]) == 0 and "action chunk" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"needs the 'serve' extra \(module 'websockets' is missing\): pip install"):
        main(["serve", "--port", "0"])

"""The Gradio Space, driven through gradio_client (and a real browser in tests/test_space_browser.py)."""

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces"))
gr = pytest.importorskip("gradio")
from app import build_demo  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from hf_vla.defaults import default_model_dir, metaworld_example  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def space():
    demo = build_demo(default_model_dir())
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_predict_through_gradio_client(space, tmp_path):
    from hf_vla import VLAPolicy

    image_path = tmp_path / "scene.png"
    Image.fromarray(metaworld_example("drawer-open")).save(image_path)
    client = Client(space, verbose=False)
    assert "/predict" in client.view_api(return_format="dict")["named_endpoints"]
    summary, plot, path, table, csv = client.predict(
        default_model_dir(), "metaworld", "open the drawer", handle_file(str(image_path)), None, None, None,
        *([0.0] * 16), api_name="/predict",
    )  # fmt: skip
    assert summary.startswith("8 steps × 4 dims (metaworld units)")
    expected = VLAPolicy.from_pretrained(default_model_dir()).predict(
        {"images": {"corner2": metaworld_example("drawer-open")}, "instruction": "open the drawer"}
    )
    rows = np.array([[row[1 + d] for d in range(4)] for row in table["data"]], dtype=np.float32)
    np.testing.assert_allclose(rows, expected, atol=1e-4)
    assert Path(csv).read_text().splitlines()[0] == "step,x,y,z,gripper"
    assert len(plot["data"]) == 8 * 4


def test_bad_models_and_images_get_messages(space, tmp_path):
    from app import predict

    client = Client(space, verbose=False)
    with pytest.raises(Exception, match=r"Could not load the model '.*no_such_model'"):
        client.predict(str(tmp_path / "no_such_model"), api_name="/load_model")
    with pytest.raises(Exception, match=r"The controls are for .*: press 'Load model' to use .*other"):
        client.predict(str(tmp_path / "other"), "metaworld", "go", None, None, None, None, *([0.0] * 16),
                       api_name="/predict")  # fmt: skip
    model = default_model_dir()
    for image in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8)):  # a direct call is not cast
        with pytest.raises(gr.Error, match=rf"Camera 'corner2': expected an RGB image .*got {image.dtype}"):
            predict(model, model, "metaworld", "go", image, None, None, None, *([0.0] * 16))


def test_missing_image_is_reported(space):
    client = Client(space, verbose=False)
    with pytest.raises(Exception, match="Add an image for camera 'corner2'"):
        client.predict(default_model_dir(), "metaworld", "go", None, None, None, None, *([0.0] * 16),
                       api_name="/predict")  # fmt: skip


def test_models_the_controls_cannot_show_are_refused_and_sliders_follow_the_embodiment(tmp_path):
    import app

    from hf_vla.testing import build_tiny_vla

    model, processor = build_tiny_vla("oft", tmp_path / "build", state_dim=20)
    model.save_pretrained(tmp_path / "wide")
    processor.save_pretrained(tmp_path / "wide")
    with pytest.raises(gr.Error, match=r"up to 4 cameras and 16 state values; .* takes 2 cameras and a state of 20"):
        app.load_policy(str(tmp_path / "wide"))

    model, processor = build_tiny_vla("oft", tmp_path / "build2", state_dim=3)
    rng = np.random.default_rng(0)
    processor.compute_norm_stats("far", rng.normal(size=(64, 7)), rng.uniform(10, 20, size=(64, 3)))
    model.save_pretrained(tmp_path / "two")
    processor.save_pretrained(tmp_path / "two")
    path = str(tmp_path / "two")
    for key in ("demo", "far"):
        sliders = [update for update in app.embodiment_controls(path, key) if update.get("visible")]
        stats = processor.norm_stats[key]["state"]
        assert [s["minimum"] for s in sliders] == pytest.approx(stats["min"])
        assert [s["maximum"] for s in sliders] == pytest.approx(stats["max"])
    assert all(update == gr.update() for update in app.embodiment_controls(path, "typing..."))


def test_downloads_do_not_pile_up():
    import app

    paths = [app.download_path() for _ in range(app.KEPT_DOWNLOADS + 5)]
    assert len(set(paths)) == len(paths)
    assert sum(Path(p).exists() for p in paths) == app.KEPT_DOWNLOADS and Path(paths[-1]).exists()


def test_the_path_plot_reads_actions_made_absolute_as_positions(tmp_path):
    import app

    from hf_vla.testing import build_tiny_vla

    model, processor = build_tiny_vla("oft", tmp_path / "build", state_dim=7)
    rng = np.random.default_rng(0)
    stats = processor.compute_norm_stats("arm", rng.normal(size=(64, 7)), rng.normal(size=(64, 7)))
    processor.set_norm_stats("arm_rel", {**stats, "action_mode": ["rel"] * 6 + ["abs"]})
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    path = str(tmp_path / "model")
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    state = [0.5] * 7 + [0.0] * 9
    for key, absolute in (("arm", False), ("arm_rel", True)):
        _, _, figure, table, _ = app.predict(path, path, key, "go", image, image, None, None, *state)
        actions = table.drop(columns="step").to_numpy()
        xyz = np.array([figure.data[0][axis] for axis in "xyz"]).T
        expected = actions[:, :3] if absolute else np.vstack([np.zeros(3), np.cumsum(actions[:, :3], axis=0)])
        np.testing.assert_allclose(xyz, expected, atol=1e-4)  # the table is rounded to 5 decimals
        assert figure.layout.title.text.endswith("(absolute xyz)" if absolute else "(cumulative xyz)")


def test_a_model_without_state_asks_for_the_state_its_relative_actions_start_from(tmp_path):
    import app

    from hf_vla.testing import build_tiny_vla

    model, processor = build_tiny_vla("oft", tmp_path / "build", state_dim=0)
    stats = processor.compute_norm_stats("arm", np.random.default_rng(0).normal(size=(64, 7)))
    processor.set_norm_stats("arm_rel", {**stats, "action_mode": ["rel"] * 6 + ["abs"]})
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    path = str(tmp_path / "model")
    assert not [update for update in app.embodiment_controls(path, "arm") if update.get("visible")]
    sliders = [update for update in app.embodiment_controls(path, "arm_rel") if update.get("visible")]
    assert [(s["label"], s["minimum"], s["maximum"]) for s in sliders] == [(f"state[{i}]", -1.0, 1.0) for i in range(6)]

    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    state = [0.25, -0.5, 0.75, 0.1, -0.2, 0.3] + [0.9] * 10  # the hidden sliders' values are not sent
    absolute, relative = (app.predict(path, path, key, "go", image, image, None, None, *state)[3]
                          .drop(columns="step").to_numpy() for key in ("arm", "arm_rel"))  # fmt: skip
    np.testing.assert_allclose(relative[:, :6], absolute[:, :6] + np.array(state[:6]), atol=2e-5)  # 5-decimal table
    np.testing.assert_allclose(relative[:, 6], absolute[:, 6], atol=1e-5)

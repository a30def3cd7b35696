"""The Space in headless Chromium: upload an image, click Predict, read the result, keep a screenshot."""

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces"))
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
from app import build_demo  # noqa: E402

from hf_vla.defaults import default_model_dir, metaworld_example  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("HF_VLA_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs it with apt-get)")
def test_space_in_a_real_browser(tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(metaworld_example("drawer-open")).save(image)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(default_model_dir())
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])  # fmt: skip
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            # not "networkidle": with a gr.State the page keeps a heartbeat connection open
            page.goto(f"http://127.0.0.1:{port}", wait_until="load", timeout=60_000)
            sync_api.expect(page.locator("#camera-0 input[type=file]")).to_be_attached(timeout=60_000)
            page.locator("#camera-0 input[type=file]").set_input_files(str(image))
            page.get_by_label("Instruction").fill("open the drawer")
            page.locator("#predict-btn").click()
            summary = page.locator("#summary textarea")
            sync_api.expect(summary).to_have_value(
                __import__("re").compile(r"^8 steps × 4 dims \(metaworld units\)"), timeout=60_000
            )
            page.wait_for_timeout(500)  # let the plots render before the screenshot
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)
            assert page.locator("#action-plot canvas, #action-plot svg").count() > 0
            browser.close()
    finally:
        demo.close()
    assert (ARTIFACTS / "space.png").stat().st_size > 10_000

"""hf_vla Space: interactive action prediction.

Pick a model (a local directory or a hub id; the embedded default when empty) and press Load model, give one image
per camera, an instruction and the robot state, press Predict: the action chunk comes back in robot units as
per-dimension plots, a 3-D end-effector path (cumulative xyz deltas) and a table you can download.

    python spaces/app.py [--model PATH_OR_ID] [--port 7860]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from collections import deque
from functools import lru_cache

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from hf_vla import VLAPolicy
from hf_vla.defaults import DEFAULT_INSTRUCTION, EXAMPLE_TASKS, default_model_dir, metaworld_example
from hf_vla.normalization import expand_action_modes, is_relative, relative_state_width

MAX_CAMERAS = 4
MAX_STATE = 16
AXES = {7: ["x", "y", "z", "roll", "pitch", "yaw", "gripper"], 4: ["x", "y", "z", "gripper"]}
KEPT_DOWNLOADS = 32  # CSV files kept on disk (Gradio copies each into its cache when the reply is sent)
_downloads: deque[str] = deque()
_download_dir: str | None = None


@lru_cache(maxsize=4)
def _load_policy(model: str) -> VLAPolicy:
    return VLAPolicy.from_pretrained(model or default_model_dir())


def load_policy(model: str) -> VLAPolicy:
    try:
        policy = _load_policy(model)
    except (OSError, ValueError) as error:  # not a model directory, unknown hub id, malformed files
        raise gr.Error(f"Could not load the model {model!r}: {error}") from error
    processor = policy.processor
    widest_state = max([state_width(processor, key) for key in processor.norm_stats] + [processor.state_dim])
    if len(processor.camera_names) > MAX_CAMERAS or widest_state > MAX_STATE:
        raise gr.Error(f"This Space shows up to {MAX_CAMERAS} cameras and {MAX_STATE} state values; "
                       f"{model or 'the model'} takes {len(processor.camera_names)} cameras and a state of "
                       f"{widest_state}: serve it with `hf-vla serve` instead.")
    return policy


def state_width(processor, key: str | None) -> int:
    """The state values asked for: the model's, or for a model that reads none, those its relative actions are made
    absolute from (action dimension i from state value i)."""
    if processor.state_dim:
        return processor.state_dim
    return relative_state_width(processor.embodiment_action_mode(key), processor.action_dim)


def dimension_names(action_dim: int) -> list[str]:
    return AXES.get(action_dim, [f"a{i}" for i in range(action_dim)])


def state_sliders(model: str, key: str | None) -> list[dict]:
    """One slider per state value, over the range embodiment `key`'s statistics saw ([-1, 1] without statistics)."""
    processor = load_policy(model).processor
    stats = processor.norm_stats.get(key, {}).get("state") if key else None
    width = state_width(processor, key)
    sliders = []
    for i in range(MAX_STATE):
        if i < width:
            low, high = (float(stats["min"][i]), float(stats["max"][i])) if stats is not None else (-1.0, 1.0)
            low, high = (low - 1.0, high + 1.0) if low == high else (low, high)
            sliders.append({"visible": True, "minimum": low, "maximum": high, "value": float(np.clip(0.0, low, high)),
                            "step": (high - low) / 100, "label": f"state[{i}]"})  # fmt: skip
        else:
            sliders.append({"visible": False})
    return sliders


def control_settings(model: str) -> tuple[str, dict, list[dict], list[dict]]:
    """Description, embodiment choices, camera inputs and state sliders for a model."""
    policy = load_policy(model)
    processor = policy.processor
    keys = sorted(processor.norm_stats)
    names = processor.camera_names
    cameras = [{"visible": i < len(names), "label": f"Camera: {names[i]}" if i < len(names) else f"Camera {i}"}
               for i in range(MAX_CAMERAS)]  # fmt: skip
    sliders = state_sliders(model, keys[0] if keys else None)
    config = policy.model.config
    info = (f"**{type(policy.model).__name__}** · backbone `{config.vlm_config.model_type}` · cameras {names} · "
            f"state {processor.state_dim} · actions {config.action_horizon}×{config.action_dim}")
    if not model:
        info += " · embedded default model"
    return info, {"choices": keys, "value": keys[0] if keys else None}, cameras, sliders


def model_controls(model: str):
    """The loaded model's name and the UI updates for it."""
    info, embodiments, cameras, sliders = control_settings(model)
    return [model, info, gr.update(**embodiments), *(gr.update(**c) for c in cameras),
            *(gr.update(**s) for s in sliders)]  # fmt: skip


def embodiment_controls(loaded: str, key: str | None):
    """The loaded model's state sliders re-ranged for the chosen embodiment."""
    processor = load_policy(loaded).processor
    if key not in processor.norm_stats:  # a custom value being typed: Predict names the known keys
        return [gr.update() for _ in range(MAX_STATE)]
    return [gr.update(**slider) for slider in state_sliders(loaded, key)]


def download_path() -> str:
    """A new CSV path; only the last KEPT_DOWNLOADS files stay on disk, and the folder goes at exit."""
    global _download_dir
    if _download_dir is None:
        _download_dir = tempfile.mkdtemp(prefix="hf_vla_space_")
        atexit.register(shutil.rmtree, _download_dir, ignore_errors=True)
    handle, path = tempfile.mkstemp(prefix="actions_", suffix=".csv", dir=_download_dir)
    os.close(handle)
    _downloads.append(path)
    while len(_downloads) > KEPT_DOWNLOADS:
        old = _downloads.popleft()
        if os.path.exists(old):
            os.remove(old)
    return path


def predict(model: str, loaded: str, unnorm_key: str | None, instruction: str, *inputs):
    if model != loaded:  # its cameras and state sliders are not the ones shown (hidden sliders would send zeros)
        raise gr.Error(f"The controls are for {loaded or 'the embedded default model'}: press 'Load model' to use "
                       f"{model or 'the embedded default model'}.")
    policy = load_policy(model)
    processor = policy.processor
    images, state_values = inputs[:MAX_CAMERAS], inputs[MAX_CAMERAS:]
    views = {}
    for name, image in zip(processor.camera_names, images):
        if image is None:
            raise gr.Error(f"Add an image for camera '{name}'.")
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise gr.Error(f"Camera '{name}': expected an RGB image (uint8 [H, W, 3]), got {image.dtype} "
                           f"{list(image.shape)}.")
        views[name] = image[..., :3]  # an RGBA upload without its alpha
    if not instruction or not instruction.strip():
        raise gr.Error("Type an instruction.")
    obs = {"images": views, "instruction": instruction.strip()}
    try:
        key = processor.embodiment_key(unnorm_key or policy.unnorm_key, "unnorm_key")
        width = state_width(processor, key)
        if width:
            obs["state"] = np.asarray(state_values[:width], dtype=np.float32)
        actions = policy.predict(obs, unnorm_key=unnorm_key or None)
    except ValueError as error:
        raise gr.Error(str(error)) from error

    names = dimension_names(actions.shape[1])
    table = pd.DataFrame(actions.astype(np.float64), columns=names)
    table.insert(0, "step", np.arange(len(actions)))
    long = table.melt(id_vars="step", var_name="dimension", value_name="value")
    csv = download_path()
    table.to_csv(csv, index=False)
    summary = (f"{actions.shape[0]} steps × {actions.shape[1]} dims ({unnorm_key or 'default'} units); first step: "
               + ", ".join(f"{n}={v:+.4f}" for n, v in zip(names, actions[0])))  # fmt: skip
    positions = expand_action_modes(processor.embodiment_action_mode(key), processor.action_dim)[:3]
    return summary, long, end_effector_path(actions, absolute=is_relative(positions)), table.round(5), csv


def end_effector_path(actions: np.ndarray, absolute: bool = False) -> go.Figure:
    """The path the first three action dimensions trace: read as xyz deltas from the origin, or, for actions the
    policy made absolute from the state (relative action modes), as the positions themselves."""
    figure = go.Figure()
    if actions.shape[1] >= 3:
        xyz = actions[:, :3].astype(np.float64)
        path = xyz if absolute else np.vstack([np.zeros(3), np.cumsum(xyz, axis=0)])
        figure.add_trace(go.Scatter3d(x=path[:, 0], y=path[:, 1], z=path[:, 2], mode="lines+markers",
                                      marker={"size": 3, "color": np.arange(len(path)), "colorscale": "Viridis"}))  # fmt: skip
    title = "end-effector path (absolute xyz)" if absolute else "end-effector path (cumulative xyz)"
    figure.update_layout(margin={"l": 0, "r": 0, "t": 30, "b": 0}, title=title,
                         scene={"xaxis_title": "x", "yaxis_title": "y", "zaxis_title": "z"})  # fmt: skip
    return figure


def build_demo(model: str | None = None) -> gr.Blocks:
    model = model or ""
    with gr.Blocks(title="hf_vla: vision-language-action policies") as demo:
        gr.Markdown("# hf_vla action prediction\nGive each camera an image, an instruction and the robot state; "
                    "the policy returns an action chunk in robot units.")  # fmt: skip
        with gr.Row():
            model_box = gr.Textbox(value=model, label="Model (local directory or hub id; empty = embedded default)",
                                   elem_id="model-box", scale=4)  # fmt: skip
            load_button = gr.Button("Load model", scale=1)
        description, embodiments, camera_settings, slider_settings = control_settings(model)
        info = gr.Markdown(description, elem_id="model-info")
        with gr.Row():
            cameras = [gr.Image(type="numpy", elem_id=f"camera-{i}", sources=["upload", "webcam", "clipboard"],
                                **settings) for i, settings in enumerate(camera_settings)]  # fmt: skip
        with gr.Row():
            instruction = gr.Textbox(label="Instruction", value=DEFAULT_INSTRUCTION, elem_id="instruction", scale=3)
            unnorm_key = gr.Dropdown(label="Embodiment (unnorm_key)", elem_id="unnorm-key", scale=1,
                                     allow_custom_value=True, **embodiments)  # fmt: skip
        with gr.Accordion("Robot state", open=False):
            sliders = [gr.Slider(**{"minimum": -1, "maximum": 1, "value": 0, "label": f"state[{i}]", **settings})
                       for i, settings in enumerate(slider_settings)]  # fmt: skip
        predict_button = gr.Button("Predict", variant="primary", elem_id="predict-btn")
        summary = gr.Textbox(label="Summary", elem_id="summary")
        with gr.Row():
            plot = gr.LinePlot(x="step", y="value", color="dimension", label="Actions per dimension",
                               elem_id="action-plot")  # fmt: skip
            path = gr.Plot(label="End-effector path", elem_id="path-plot")
        table = gr.Dataframe(label="Action chunk", elem_id="action-table")
        download = gr.File(label="Download (CSV)", elem_id="download")
        gr.Examples([[metaworld_example(task), text] for task, text in EXAMPLE_TASKS.items()],
                    inputs=[cameras[0], instruction], label="Meta-World scenes the default model has not seen")  # fmt: skip

        loaded = gr.State(model)  # the model the controls were built for
        controls = [loaded, info, unnorm_key, *cameras, *sliders]
        load_button.click(model_controls, inputs=model_box, outputs=controls, api_name="load_model")
        unnorm_key.change(embodiment_controls, inputs=[loaded, unnorm_key], outputs=sliders, api_name=False)
        predict_button.click(
            predict,
            inputs=[model_box, loaded, unnorm_key, instruction, *cameras, *sliders],
            outputs=[summary, plot, path, table, download],
            api_name="predict",
        )
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("HF_VLA_MODEL", ""))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    demo = build_demo(args.model)
    _, url, _ = demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                            show_error=True)  # fmt: skip
    print(f"hf_vla Space running at {url} with {args.model or 'the embedded default model'} (Ctrl-C to stop)",
          flush=True)  # fmt: skip
    demo.block_thread()


if __name__ == "__main__":
    main()

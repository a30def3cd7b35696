"""Releases through the real huggingface_hub client against a local fake Hub (tests/fake_hub.py)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import make_oft
from fake_hub import FakeHub
from transformers import AutoProcessor

from hf_vla import AutoModelForVLA
from hf_vla.hub import build_model_card, push_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tiny_vlm_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    model, processor = make_oft(tiny_vlm_dirs["qwen3_vl"])
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "training_recipe.yaml").write_text("model:\n  variant: oft\ndata:\n  datasets: [lerobot/bridge]\n")
    report = {"tasks": {"drawer-open": {"success_rate": 0.9, "episodes": 20, "ci95": [0.7, 0.97]}}}
    (path / "eval_results.json").write_text(json.dumps(report))
    for leftover in ("checkpoint-2/model.safetensors", "checkpoint-2/trainer_state.json", "tiny_vlm/config.json"):
        (path / leftover).parent.mkdir(exist_ok=True)  # what a training run leaves beside the model
        (path / leftover).write_text("{}")
    return path


def test_card_carries_metadata_and_computed_sections(model_dir):
    card = build_model_card(model_dir, repo_id="tester/tiny-oft")
    data = card.data.to_dict()
    assert data["library_name"] == "hf_vla" and data["pipeline_tag"] == "robotics"
    assert data["datasets"] == ["lerobot/bridge"] and "vla_oft" in data["tags"]
    text = card.text
    assert "| `action_head.fc1` | 8,320 |" in text  # Linear(64 → 128): 64·128 + 128
    assert "| drawer-open | 90.0% | 20 | 70.0–97.0% |" in text
    assert "variant: oft" in text and "| `bridge` | q99 | q99 | abs | 256 |" in text
    assert 'AutoModelForVLA.from_pretrained("tester/tiny-oft"' in text
    assert 'unnorm_key="bridge")' in text  # the snippet decodes with the model's statistics key
    model = AutoModelForVLA.from_pretrained(model_dir)
    assert f"| **total** | **{sum(p.numel() for p in model.parameters()):,}** |" in text


@pytest.mark.parametrize("variant, state_line", [
    ("oft", "6 dimensions, written into the prompt as numbers: each dimension's bin among 256 uniform bins over "
            "[-1, 1]"),
    ("bins", "6 dimensions, written into the prompt as action tokens: each dimension's bin among 32 uniform bins "
             "over [-1, 1]"),
    ("gr00t", "6 dimensions, encoded by the action head"),
    ("fast", "6 dimensions in the statistics, but this model does not read the state"),
])  # fmt: skip
def test_card_says_how_the_model_reads_the_state(variant, state_line, tmp_path):
    from hf_vla.testing import build_tiny_vla

    model, processor = build_tiny_vla(variant, out_dir=tmp_path)
    model.save_pretrained(tmp_path / "release")
    processor.save_pretrained(tmp_path / "release")
    assert f"- State: {state_line}." in build_model_card(tmp_path / "release").text


def test_card_lists_the_relative_dimensions(model_dir, tmp_path):
    import shutil

    run = shutil.copytree(model_dir, tmp_path / "run")
    processor = AutoProcessor.from_pretrained(run)
    stats = processor.norm_stats["bridge"]
    processor.set_norm_stats("bridge", {**stats, "action_mode": ["delta"] * 6 + ["abs"]})
    processor.set_norm_stats("arm", {**stats, "action_mode": ["rel"] * 3 + ["delta"] * 3 + ["abs"]})
    processor.save_pretrained(run)
    text = build_model_card(run, repo_id="tester/run").text
    assert "| `bridge` | q99 | q99 | 'delta' on dimensions [0, 1, 2, 3, 4, 5] | 256 |" in text
    assert "| `arm` | q99 | q99 | 'rel' on dimensions [0, 1, 2], 'delta' on dimensions [3, 4, 5] | 256 |" in text


def test_card_snippet_returns_absolute_actions_for_relative_statistics(model_dir, tmp_path):
    import shutil

    import numpy as np

    run = shutil.copytree(model_dir, tmp_path / "run")
    processor = AutoProcessor.from_pretrained(run)
    stats = processor.norm_stats["bridge"]
    processor.set_norm_stats("bridge", {**stats, "action_mode": ["rel"] * 6 + ["abs"]})  # openpi's: gripper absolute
    processor.save_pretrained(run)
    snippet = build_model_card(run, repo_id=str(run)).text.split("```python\n")[1].split("```")[0]
    rng = np.random.default_rng(0)
    primary, wrist = (rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2))
    state = 10 + rng.normal(size=6).astype(np.float32)
    namespace = {"primary": primary, "wrist": wrist, "state": state}
    exec(snippet, namespace)  # the card's own code, as a user copies it

    model, processor = namespace["model"], namespace["processor"]
    relative = processor.decode_actions(model.predict_action(**namespace["inputs"]), unnorm_key="bridge")
    expected = relative.copy()
    expected[..., :6] += state
    np.testing.assert_allclose(namespace["actions"], expected, rtol=1e-6)


def test_card_snippet_runs_for_lerobot_camera_names(model_dir, tmp_path):
    """train_vla names the views by their LeRobot features (`observation.images.top`) unless renamed: the snippet's
    views must still be variables a user can define, not attribute lookups on an undefined `observation`."""
    import ast
    import shutil

    import numpy as np

    run = shutil.copytree(model_dir, tmp_path / "run")
    config = json.loads((run / "processor_config.json").read_text())
    cameras = ["observation.images.top", "observation.images.wrist-left", "3rd_person"]
    (run / "processor_config.json").write_text(json.dumps({**config, "camera_names": cameras}))
    snippet = build_model_card(run, repo_id=str(run)).text.split("```python\n")[1].split("```")[0]
    call = next(node for node in ast.walk(ast.parse(snippet))
                if isinstance(node, ast.keyword) and node.arg == "images").value  # fmt: skip
    views = call.elts[0].elts
    assert [type(view) for view in views] == [ast.Name] * 3, ast.unparse(call)
    names = [view.id for view in views]
    assert names == ["observation_images_top", "observation_images_wrist_left", "view_3rd_person"]
    rng = np.random.default_rng(0)
    namespace = {name: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for name in names}
    namespace["state"] = rng.normal(size=6).astype(np.float32)
    exec(snippet, namespace)
    assert namespace["actions"].shape == (1, 4, 7) and np.isfinite(namespace["actions"]).all()


def test_card_base_model_names_a_hub_model_never_a_local_folder(tiny_vlm_dirs, tmp_path, monkeypatch):
    """A backbone given as a relative folder (`vlms/qwen`, which reads like a hub id) is recorded as the folder it
    was, so a card made from another directory or machine does not claim a hub model of that name (the Hub refuses
    a card whose base_model is no model); a folder of the hub cache names the model it holds."""
    from pathlib import Path

    vlm = Path(tiny_vlm_dirs["qwen2_5_vl"])
    monkeypatch.chdir(vlm.parent.parent)
    relative = f"{vlm.parent.name}/{vlm.name}"
    model, processor = make_oft(relative)
    model.save_pretrained(tmp_path / "release")
    processor.save_pretrained(tmp_path / "release")
    assert model.config.base_vlm == str(vlm)
    monkeypatch.chdir(tmp_path)  # pushed from elsewhere
    card = build_model_card(tmp_path / "release", repo_id="tester/x")
    assert "base_model" not in card.data.to_dict() and "initialised from" not in card.text

    config = json.loads((tmp_path / "release" / "config.json").read_text())
    snapshot = "/data/hf/hub/models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/66285546d2b821cf421d4f5eb2576359d3770cd3"
    for base_vlm in ("Qwen/Qwen2.5-VL-3B-Instruct", snapshot, snapshot + "/"):
        (tmp_path / "release" / "config.json").write_text(json.dumps({**config, "base_vlm": base_vlm}))
        card = build_model_card(tmp_path / "release", repo_id="tester/x")
        assert card.data.to_dict()["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct", base_vlm
        link = "[`Qwen/Qwen2.5-VL-3B-Instruct`](https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct)"
        assert f"initialised from {link}" in card.text


def test_card_shows_a_missing_or_partial_interval_as_a_dash(model_dir, tmp_path):
    import shutil

    run = shutil.copytree(model_dir, tmp_path / "run")
    tasks = {"a": {"success_rate": 0.5, "episodes": 4, "ci95": None}, "b": {"success_rate": 0.25, "episodes": 4,
             "ci95": [0.1, None]}, "c": {"success_rate": 1.0, "episodes": 4}}  # fmt: skip
    (run / "eval_results.json").write_text(json.dumps({"tasks": tasks}))
    text = build_model_card(run, repo_id="tester/run").text
    for row in ("| a | 50.0% | 4 | – |", "| b | 25.0% | 4 | – |", "| c | 100.0% | 4 | – |"):
        assert row in text


def test_card_reads_what_train_vla_saves(model_dir, tmp_path):
    import shutil

    run = shutil.copytree(model_dir, tmp_path / "run")
    (run / "training_recipe.yaml").write_text("data:\n  lerobot: lerobot/pusht\n")
    (run / "eval_results.json").write_text(json.dumps({"epoch": 1.0, "eval_action_l1": 0.01234, "eval_runtime": 3.2,
                                                       "eval_action_valid_fraction": 1.0}))  # fmt: skip
    card = build_model_card(run, repo_id="tester/run")
    assert card.data.to_dict()["datasets"] == ["lerobot/pusht"]
    assert "| action_l1 | 0.01234 |" in card.text and "| action_valid_fraction | 1 |" in card.text
    assert "runtime" not in card.text and "No evaluation results" not in card.text

    mixture = {"datasets": [{"path": "lerobot/aloha", "weight": 2.0}, {"path": "lerobot/pusht"}]}
    (run / "mix.yaml").write_text(json.dumps(mixture))
    for spec in (json.dumps(mixture), str(run / "mix.yaml")):
        (run / "training_recipe.yaml").write_text(f"data:\n  mixture: {spec}\n")
        assert build_model_card(run).data.to_dict()["datasets"] == ["lerobot/aloha", "lerobot/pusht"]
    (run / "training_recipe.yaml").write_text(f"data:\n  lerobot: [lerobot/pusht, {tmp_path / 'data' / 'my_demos'}]\n")
    card = build_model_card(run)
    assert card.data.to_dict()["datasets"] == ["lerobot/pusht"]
    assert "Datasets: [lerobot/pusht](https://huggingface.co/datasets/lerobot/pusht), `my_demos` (local)." in card.text
    # a mixture file's relative paths are read from its folder: a local `data/demos` beside it is not a hub id
    (run / "data" / "demos").mkdir(parents=True)
    (run / "mix.yaml").write_text(json.dumps({"datasets": [{"path": "data/demos"}, {"path": "lerobot/pusht"}]}))
    (run / "training_recipe.yaml").write_text(f"data:\n  mixture: {run / 'mix.yaml'}\n")
    card = build_model_card(run)
    assert card.data.to_dict()["datasets"] == ["lerobot/pusht"]
    assert "Datasets: `demos` (local), [lerobot/pusht](https://huggingface.co/datasets/lerobot/pusht)." in card.text


def test_release_files_are_read_as_utf8_whatever_the_locale(model_dir, tmp_path):
    """Under a locale that is not UTF-8 (Windows' cp1252, here ASCII): the package's own modules (read to export
    remote code, and by every push to tell generated modules apart) and a recipe or results naming tasks and
    datasets outside ASCII."""
    import shutil

    run = shutil.copytree(model_dir, tmp_path / "run")
    (run / "training_recipe.yaml").write_text("# démos enregistrées à Lyon\ndata:\n  lerobot: lerobot/pusht\n",
                                              encoding="utf-8")  # fmt: skip
    tasks = {"ouvrir le tiroir – café ☕": {"success_rate": 0.5, "episodes": 4}}
    (run / "eval_results.json").write_text(json.dumps({"tasks": tasks}, ensure_ascii=False), encoding="utf-8")
    script = textwrap.dedent(f"""
        import json
        from hf_vla.hub import build_model_card
        from hf_vla.hub.remote_code import export_remote_code, generated_module_names

        written = export_remote_code({str(run)!r})
        text = build_model_card({str(run)!r}, repo_id="tester/run").text
        print(json.dumps({{"written": written, "names": sorted(generated_module_names()), "text": text}}))
    """)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "configuration_oft.py" in report["written"] and "configuration_oft.py" in report["names"]
    assert '(StarVLA used "🔍", which' in (run / "configuration_oft.py").read_text(encoding="utf-8")
    text = report["text"]
    assert "# démos enregistrées à Lyon" in text and "| ouvrir le tiroir – café ☕ | 50.0% | 4 | – |" in text


def run_against_fake_hub(script: str, tmp_path) -> dict:
    """Runs `script` in a child process whose Hub is a FakeHub; returns the JSON its last line prints."""
    port = free_port()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    with FakeHub(port):
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_push_download_and_load_through_the_hub_client(model_dir, tmp_path):
    import shutil

    model_dir = shutil.copytree(model_dir, tmp_path / "release")  # the push writes its remote-code modules there
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, torch
        from pathlib import Path
        from huggingface_hub import ModelCard, snapshot_download
        from hf_vla import AutoModelForVLA, VLAProcessor
        from hf_vla.hub import push_model
        from transformers import AutoProcessor

        source = Path({str(model_dir)!r})
        push_model(source, "tester/tiny-oft", remote_code=True)
        ModelCard.load("tester/tiny-oft").validate()
        local = Path(snapshot_download("tester/tiny-oft", cache_dir={str(tmp_path / "clean_cache")!r}))
        shipped = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        identical = all((local / f).read_bytes() == (source / f).read_bytes() for f in shipped)

        model = AutoModelForVLA.from_pretrained("tester/tiny-oft")
        processor = AutoProcessor.from_pretrained("tester/tiny-oft")
        reference = AutoModelForVLA.from_pretrained(source)
        rng = np.random.default_rng(0)
        views = [[rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2)]]
        inputs = processor(images=views, text=["open the drawer"], state=np.zeros((1, 6)))
        same = torch.equal(model.predict_action(**inputs), reference.predict_action(**inputs))

        model.push_to_hub("tester/via-transformers")      # the transformers methods keep working
        processor.push_to_hub("tester/via-transformers")
        again = AutoModelForVLA.from_pretrained("tester/via-transformers")
        same_again = torch.equal(again.predict_action(**inputs), reference.predict_action(**inputs))
        print(json.dumps({{"shipped": shipped, "identical": identical, "same": same, "same_again": same_again}}))
    """)
    report = run_against_fake_hub(script, tmp_path)
    assert report["identical"] and report["same"] and report["same_again"]
    for expected in ("README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                     "chat_template.jinja", "training_recipe.yaml", "eval_results.json", "modeling_oft.py",
                     "processing_vla.py"):  # fmt: skip
        assert expected in report["shipped"], expected
    assert not [f for f in report["shipped"] if "/" in f], report["shipped"]


def test_the_card_takes_the_base_models_licence_unless_told(model_dir, tmp_path):
    """A fine-tune of Qwen2.5-VL-3B is under its qwen-research licence, not hf_vla's default apache-2.0."""
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    with pytest.raises(ValueError, match=r"license_name: a licence 'other' needs its name"):
        build_model_card(folder, license="other")
    report = run_against_fake_hub(textwrap.dedent(f"""
        import json
        from pathlib import Path
        from huggingface_hub import HfApi, ModelCard
        from hf_vla.hub import push_model

        api, folder = HfApi(), Path({str(folder)!r})
        licence = "license: other\\nlicense_name: qwen-research\\nlicense_link: https://example.org/LICENSE"
        api.create_repo("Qwen/Qwen2.5-VL-3B-Instruct")
        api.upload_file(path_or_fileobj=f"---\\n{{licence}}\\n---\\n# Qwen".encode(), path_in_repo="README.md",
                        repo_id="Qwen/Qwen2.5-VL-3B-Instruct")
        api.create_repo("Qwen/Qwen2.5-VL-7B-Instruct")  # a card without metadata
        found = {{}}
        qwen3b = "Qwen/Qwen2.5-VL-3B-Instruct"
        for base, options in ((qwen3b, {{}}), (qwen3b, {{"license": "mit"}}), ("Qwen/Qwen2.5-VL-7B-Instruct", {{}}),
                              ("Qwen/not-on-the-hub", {{}})):
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({{**config, "base_vlm": base}}))
            push_model(folder, "tester/licensed", **options)
            data = ModelCard.load("tester/licensed").data.to_dict()
            found[f"{{base}} {{options}}"] = [data.get(k) for k in ("license", "license_name", "license_link")]
        print(json.dumps(found))
    """), tmp_path)
    assert report == {
        "Qwen/Qwen2.5-VL-3B-Instruct {}": ["other", "qwen-research", "https://example.org/LICENSE"],
        "Qwen/Qwen2.5-VL-3B-Instruct {'license': 'mit'}": ["mit", None, None],
        "Qwen/Qwen2.5-VL-7B-Instruct {}": ["apache-2.0", None, None],
        "Qwen/not-on-the-hub {}": ["apache-2.0", None, None],
    }


def test_push_to_a_new_branch_creates_it(model_dir, tmp_path):
    report = run_against_fake_hub(textwrap.dedent(f"""
        import json
        from hf_vla.hub import push_model
        for _ in range(2):  # the second push finds the branch
            push_model({str(model_dir)!r}, "tester/branchy", revision="v2", write_card=False)
        print(json.dumps({{"pushed": True}}))
    """), tmp_path)
    assert report["pushed"]


def test_a_new_release_replaces_the_files_of_the_last_one(model_dir, tmp_path):
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(model_dir, first)
    second.mkdir()
    (second / "README.md").write_text("hand-written")  # kept as it is: write_card=False
    report = run_against_fake_hub(textwrap.dedent(f"""
        import json, torch
        from pathlib import Path
        from huggingface_hub import HfApi
        from hf_vla import AutoModelForVLA, VLAProcessor
        from hf_vla.hub import build_model_card, push_model

        push_model({str(first)!r}, "tester/releases", remote_code=True)  # unsharded, with eval results and modules
        for user_file in ("notes/extra.txt", "handler.py", "LICENSE.txt", "model_variants/small.safetensors"):
            HfApi().upload_file(path_or_fileobj=b"x", path_in_repo=user_file, repo_id="tester/releases")
        model = AutoModelForVLA.from_pretrained({str(first)!r})
        torch.nn.init.normal_(next(model.action_head.parameters()))  # new weights, saved as shards
        model.save_pretrained({str(second)!r}, max_shard_size="100KB")
        VLAProcessor.from_pretrained({str(first)!r}).save_pretrained({str(second)!r})
        push_model({str(second)!r}, "tester/releases", write_card=False)
        files = sorted(HfApi().list_repo_files("tester/releases"))
        loaded = AutoModelForVLA.from_pretrained("tester/releases")
        same = all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        card = build_model_card({str(first)!r}, repo_id="tester/releases", revision="v2").text
        print(json.dumps({{"files": files, "same": same, "card": card}}))
    """), tmp_path)
    files = report["files"]
    assert report["same"]  # the shards, not the first release's model.safetensors
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert "eval_results.json" not in files and [f for f in files if f.endswith(".py")] == ["handler.py"]
    # the user's files, not a release's (a folder's weights too, though `model*.safetensors` matches across "/"):
    assert {"README.md", "notes/extra.txt", "LICENSE.txt", "model_variants/small.safetensors"} <= set(files)
    assert 'AutoModelForVLA.from_pretrained("tester/releases", revision="v2", dtype=torch.bfloat16)' in report["card"]
    assert not (second / "modeling_oft.py").exists()

    (second / "model.safetensors").write_text("left over")
    with pytest.raises(ValueError, match=r"holds both model.safetensors and model.safetensors.index.json"):
        push_model(second, "tester/releases")


def test_push_keeps_hand_written_cards_and_private_repos_private(model_dir, tmp_path):
    import shutil

    from hf_vla.hub.push import is_unedited_card, signed_card

    folder = shutil.copytree(model_dir, tmp_path / "model")
    card = signed_card(str(build_model_card(folder, repo_id="tester/x")))
    assert is_unedited_card(card) and not is_unedited_card(card.replace("## Limitations", "## Limits"))
    old = "---\nlibrary_name: hf_vla\nlicense: mit\n---\n# an unsigned card of an earlier hf_vla"
    assert is_unedited_card(old)  # regenerated, as before cards were signed
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "README.md"}
    for text in ("# my own card", card.replace("## Limitations", "## Limits")):  # hand-written, or edited
        (folder / "README.md").write_text(text)
        for remote_code in (True, False):
            with pytest.raises(ValueError, match=r"README.md: not the card an earlier push generated .* --no-card"):
                push_model(folder, "tester/x", remote_code=remote_code)  # refused before anything is uploaded
            # ... or written: no remote-code modules, config.json as it was
            assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "README.md"} == before
    report = run_against_fake_hub(textwrap.dedent(f"""
        import json
        from huggingface_hub import HfApi
        from hf_vla.hub import push_model

        push_model({str(folder)!r}, "tester/mine", write_card=False)  # the hand-edited card, as it is
        card = HfApi().hf_hub_download("tester/mine", "README.md")
        try:
            push_model({str(folder)!r}, "tester/mine", private=True, write_card=False)
            refused = ""
        except ValueError as error:
            refused = str(error)
        push_model({str(folder)!r}, "tester/secret", private=True, write_card=False)
        print(json.dumps({{"card": open(card).read(), "refused": refused,
                           "secret": HfApi().repo_info("tester/secret").private}}))
    """), tmp_path)
    assert "## Limits" in report["card"] and report["secret"] is True
    assert report["refused"].startswith("private: tester/mine exists and is public")


def test_fast_save_pretrained_pushes_its_tokenizer_with_the_weights(tmp_path):
    script = textwrap.dedent(f"""
        import json
        from huggingface_hub import HfApi
        from hf_vla import AutoModelForVLA
        from hf_vla.testing import build_tiny_vla, random_observation

        model, processor = build_tiny_vla("fast", out_dir={str(tmp_path / "build")!r})
        model.save_pretrained({str(tmp_path / "fast")!r}, push_to_hub=True, repo_id="tester/fast")
        files = sorted(HfApi().list_repo_files("tester/fast"))
        loaded = AutoModelForVLA.from_pretrained("tester/fast")
        inputs = processor(**random_observation(processor))
        same = loaded.action_tokenizer is not None and bool(
            (loaded.predict_action(**inputs).nan_to_num(7) == model.predict_action(**inputs).nan_to_num(7)).all())
        print(json.dumps({{"files": files, "same": same}}))
    """)
    report = run_against_fake_hub(script, tmp_path)
    assert "action_tokenizer/processor_config.json" in report["files"] and "model.safetensors" in report["files"]
    assert report["same"]


def test_pushing_a_training_checkpoint_twice_changes_nothing_and_a_later_release_replaces_it(tmp_path):
    """A FAST `checkpoint-N` of a training run, sharded: the model, its tokenizer folder and trainer_state.json ship,
    the optimizer and RNG states do not; the same push again makes no commit; a release without the trainer's files
    then removes them."""
    report = run_against_fake_hub(textwrap.dedent(f"""
        import json, shutil, subprocess, sys, torch
        from pathlib import Path
        from huggingface_hub import HfApi
        from hf_vla.hub import push_model
        from hf_vla.testing import build_tiny_vla, random_observation

        model, processor = build_tiny_vla("fast", out_dir={str(tmp_path / "build")!r})
        checkpoint = Path({str(tmp_path / "run" / "checkpoint-10")!r})
        model.save_pretrained(checkpoint, max_shard_size="200KB")
        processor.save_pretrained(checkpoint)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            (checkpoint / name).write_bytes(b"trainer state")
        (checkpoint / "trainer_state.json").write_text(json.dumps({{"global_step": 10, "log_history": []}}))
        api = HfApi()
        commits = []
        for _ in range(2):
            push_model(checkpoint, "tester/run", remote_code=True)
            commits.append(api.repo_info("tester/run").sha)
        files = sorted(api.list_repo_files("tester/run"))
        release = shutil.copytree(checkpoint, checkpoint.parent / "release")
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
            (release / name).unlink()
        push_model(release, "tester/run", remote_code=True)

        # the shards and the tokenizer folder, downloaded by the release's own code where hf_vla is not installed
        observation = random_observation(processor)
        tokens = model.generate_actions(**processor(**observation)).action_token_ids
        torch.save({{"observation": observation, "tokens": tokens}}, checkpoint.parent / "reference.pt")
        remote = subprocess.run([sys.executable, "-c", {REMOTE_FAST_LOAD!r}, str(checkpoint.parent / "reference.pt")],
                                capture_output=True, text=True)
        print(json.dumps({{"commits": commits, "files": files, "after": sorted(api.list_repo_files("tester/run")),
                           "remote": remote.stdout.strip().splitlines()[-1:] or remote.stderr[-3000:]}}))
    """), tmp_path)
    assert report["commits"][0] == report["commits"][1]  # nothing changed, so no second commit
    files = report["files"]
    assert "trainer_state.json" in files and "action_tokenizer/tokenizer.json" in files
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-0")]) > 1
    assert not {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"} & set(files)
    assert report["after"] == [f for f in files if f != "trainer_state.json"]
    assert report["remote"] == ["same tokens from transformers_modules VLAFASTForActionPrediction VLAProcessor"]


REMOTE_FAST_LOAD = """
import sys
sys.modules["hf_vla"] = None  # not installed here
import torch
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("tester/run", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("tester/run", trust_remote_code=True)
reference = torch.load(sys.argv[1], weights_only=False)
assert model.action_tokenizer is not None
tokens = model.generate_actions(**processor(**reference["observation"])).action_token_ids
assert tokens == reference["tokens"], (tokens, reference["tokens"])
print("same tokens from", type(model).__module__.split(".")[0], type(model).__name__, type(processor).__name__)
"""


def test_release_files_are_the_top_level_ones_and_the_fast_tokenizer(tmp_path):
    from hf_vla.hub.push import release_files

    for name in ("config.json", "model.safetensors", "notes.md", "action_tokenizer/tokenizer.json",
                 "action_tokenizer/processor_config.json", "checkpoint-4/model.safetensors", "runs/events.txt"):  # fmt: skip
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    assert release_files(tmp_path) == ["action_tokenizer/processor_config.json", "action_tokenizer/tokenizer.json",
                                       "config.json", "model.safetensors"]  # fmt: skip


def test_a_lora_adapter_folder_is_not_pushed(tmp_path):
    from hf_vla.hub.push import push_model

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/runs/x/lora_base"}))
    with pytest.raises(ValueError, match=r"a LoRA adapter, not a model; push the merged model"):
        push_model(tmp_path, "tester/adapter")
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json; expected a directory written by save_pretrained"):
        push_model(tmp_path, "tester/adapter")

"""Releases load where hf_vla is not installed: generated flat modules + auto_map, trust_remote_code=True."""

import json
import re
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import make_oft, random_views
from test_flow_variants import make_flow
from test_token_variants import make_token_model

from transformers import AutoModel

from hf_vla import AutoModelForVLA
from hf_vla.action_tokenizers import FASTTokenizer
from hf_vla.hub.remote_code import export_remote_code


def build(variant, vlm_dirs):
    if variant == "oft":
        return make_oft(vlm_dirs["qwen2_5_vl"])
    if variant == "fast":
        chunks = np.random.default_rng(0).uniform(-0.5, 0.5, (200, 4, 3)).cumsum(1) / 4
        return make_token_model(vlm_dirs["qwen3_vl"], "fast", FASTTokenizer.fit(chunks, vocab_size=64))
    if variant == "bins":  # its state goes into the prompt as action tokens
        return make_token_model(vlm_dirs["qwen2_5_vl"], "bins", None, state_in_prompt=True)
    return make_flow(vlm_dirs["qwen3_vl"] if variant in ("pi_v3", "pi") else vlm_dirs["qwen2_5_vl"], variant)


@pytest.mark.parametrize("variant", ["oft", "gr00t", "pi", "pi_v3", "fast", "bins"])
def test_release_loads_without_hf_vla(tiny_vlm_dirs, tmp_path, variant):
    model, processor = build(variant, tiny_vlm_dirs)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    written = export_remote_code(tmp_path)
    assert "processing_vla.py" in written
    assert "testing.py" not in written  # imported only by the modules' smoke runs, which releases leave out
    for name in written:
        source = (tmp_path / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+(hf_vla|\.\.)", source, re.M), name
        assert '__name__ == "__main__"' not in source, name
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}
    # with hf_vla installed, the Auto classes keep using the package's own classes
    assert type(AutoModel.from_pretrained(tmp_path)) is type(model)
    assert type(AutoModelForVLA.from_pretrained(tmp_path)) is type(model)

    rng = np.random.default_rng(0)
    state_dim = processor.state_dim
    raw = {"images": random_views(rng, 2), "text": ["open the drawer", "pose la tasse à gauche ☕"],
           "state": rng.normal(size=(2, state_dim))}  # fmt: skip
    inputs = processor(**raw)
    noise = torch.randn(2, model.config.action_horizon, model.config.action_dim)
    kwargs = {"noise": noise} if variant in ("gr00t", "pi", "pi_v3") else {}
    expected = model.predict_action(**inputs, **kwargs)
    # a random token model's reply rarely decodes (NaN chunks): its generated token ids are compared as well
    tokens = model.generate_actions(**inputs).action_token_ids if variant in ("fast", "bins") else None
    # a chunk decoded in robot units, so that the remote processor's statistics and decoding are compared too
    chunk = torch.from_numpy(rng.uniform(-1, 1, (2, model.config.action_horizon, model.config.action_dim)))
    decoded = processor.decode_actions(chunk.float(), unnorm_key=next(iter(processor.norm_stats)))
    reference = {"raw": raw, "inputs": dict(inputs), "kwargs": kwargs, "expected": expected, "tokens": tokens,
                 "chunk": chunk.float(), "decoded": decoded, "unnorm_key": next(iter(processor.norm_stats))}
    torch.save(reference, tmp_path / "reference.pt")

    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_vla"] = None   # hf_vla is not installed here
        import numpy as np
        import torch
        from transformers import AutoModel, AutoProcessor
        path = {str(tmp_path)!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        reference = torch.load(path + "/reference.pt", weights_only=False)
        inputs = processor(**reference["raw"])
        assert sorted(inputs) == sorted(reference["inputs"]), (sorted(inputs), sorted(reference["inputs"]))
        for key, value in reference["inputs"].items():
            assert torch.equal(inputs[key], value), key
        out = model.predict_action(**inputs, **reference["kwargs"])
        assert torch.allclose(out, reference["expected"], equal_nan=True), (out, reference["expected"])
        if reference["tokens"] is not None:
            tokens = model.generate_actions(**inputs).action_token_ids
            assert tokens == reference["tokens"], (tokens, reference["tokens"])
        decoded = processor.decode_actions(reference["chunk"], unnorm_key=reference["unnorm_key"])
        assert np.array_equal(decoded, reference["decoded"]), (decoded, reference["decoded"])
        actions = processor.decode_actions(out)
        print("ok", type(model).__name__, type(processor).__name__, actions.shape)
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("ok " + type(model).__name__ + " VLAProcessor")


def test_export_then_remove_leaves_only_the_users_files(tmp_path):
    """No model needed: export reads config.json's model_type; remove undoes exactly what export wrote."""
    from hf_vla.hub.remote_code import remove_remote_code

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vla_gr00t", "action_dim": 7}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "VLAProcessor"}))
    (tmp_path / "handler.py").write_text("# a user's own endpoint handler\n")
    written = export_remote_code(tmp_path)
    assert {"configuration_gr00t.py", "modeling_gr00t.py", "processing_vla.py"} <= set(written)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_gr00t.VLAGR00TConfig",
                                  "AutoModel": "modeling_gr00t.VLAGR00TForActionPrediction"}
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_vla.VLAProcessor"}
    assert sorted(remove_remote_code(tmp_path)) == sorted(written)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["handler.py"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "vla_gr00t", "action_dim": 7}
    assert json.loads((tmp_path / "processor_config.json").read_text()) == {"processor_class": "VLAProcessor"}
    assert remove_remote_code(tmp_path) == []


def test_flattened_imports_keep_aliases_and_indentation():
    from hf_vla.hub.remote_code import flatten_module

    source = flatten_module("hf_vla.data.lerobot")
    assert "\nfrom .normalization import compute_stats as compute_feature_stats\n" in source
    policy = flatten_module("hf_vla.policy")  # a function-level import keeps its indentation
    assert re.search(r"\n[ ]{8,}from \.packed_linear import pack_linear_weights as pack\n", policy)
    compile(source, "lerobot.py", "exec")
    compile(policy, "policy.py", "exec")

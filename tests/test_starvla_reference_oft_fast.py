"""hf_vla's OFT (`vla_oft`) and FAST (`vla_fast`) variants against an independent, plain-torch reference of StarVLA's
QwenOFT and QwenFast computations, run on the very same weights.

The reference below is written from StarVLA's source (github.com/starVLA/starVLA, branch starVLA_dev) and
shared/reference/starvla.md; it shares no code with hf_vla. It starts from the flat StarVLA-named state dict that a
StarVLA checkpoint holds (`to_starvla(model.state_dict(), variant)`), loads the `qwen_vl_interface.model.*` part into a
plain transformers `*ForConditionalGeneration` (what StarVLA's `qwen_vl_interface.model` is), and recomputes:

OFT  (starVLA/model/framework/VLM4A/QwenOFT.py, modules/action_model/MLP_ActionHeader.py)
  - the instruction text: `{instr} [STATE] {bins} [ACTION]` (share_tools.add_discretized_state_to_instruction), then
    `" Please predict the next {H} robot actions: <action>" + placeholder*H + "<action>."` (Qwenvl_OFT.forward), then
    `CoT_prompt.replace("{instruction}", ...)` (QWen2_5 / QWen3 `build_qwenvl_inputs`);
  - the chat prompt and left-padded token ids (`build_qwenvl_inputs`: one user turn, images first,
    `add_generation_prompt=True`, `padding=True`, tokenizer padding_side "left");
  - `hidden_states[-1]` of the VLM forward, gathered at the last H placeholder positions sorted by position
    (Qwenvl_OFT._gather_action_token_embeddings);
  - `L1RegressionActionHead` = MLPResNet(num_blocks=2, in=Hd, hidden=2Hd, out=D): LN → fc1 → ReLU →
    2 × [x + ReLU(Linear(LN(x)))] → LN → fc2, per token;
  - the loss: `masked_l1_loss` (mean |pred − target| over all B·H·D cells, or over the True cells of a [B, H, D]
    mask), targets = last H steps; inference returns the head output as is.
FAST (starVLA/model/framework/VLM4A/QwenFast.py, modules/action_model/fast_ActionHeader.py, modules/vlm/QWen*.py,
      physical-intelligence/fast processing_action_tokenizer.py)
  - FAST ids of the normalised chunk (UniversalActionProcessor.__call__), as `<robot_action_{id}>` strings
    concatenated without separators (Qwenvl_Fast.map_fast_token_to_vlm_action);
  - the prompt with the assistant turn holding that string *and* `add_generation_prompt=True` (so an extra empty
    assistant header follows the reply); labels = input_ids with everything before the first id in
    [ACTION_MIN, ACTION_MAX] and every pad token set to -100; loss = the HF causal-LM loss of the VLM;
  - decoding: keep every generated id in the action range, in order, subtract ACTION_MIN, FAST-decode
    (UniversalActionProcessor.decode: BPE decode → ord + min_token → reshape(-1, D) → IDCT(·/scale), zeros when
    the shape is wrong or decoding raises).

Where hf_vla deliberately differs (comments at each place): its OFT placeholder defaults to `<|fim_pad|>` (StarVLA
hard-codes "🔍", which splits under Qwen3.5 tokenizers; a converted StarVLA checkpoint sets action_token="🔍"), it
needs exactly H placeholders (StarVLA: at least H, takes the last H), FAST's loss covers the reply (action span +
<|im_end|>) but not the empty assistant header StarVLA's template call appends after it, FAST decoding is greedy and constrained to
action tokens + <|im_end|>, and an undecodable reply gives a NaN row and valid=False instead of FAST's all-zero chunk.
The tiny backbones have no `-Action` vocabulary, so StarVLA's hard-coded action range (151665–153712 on Qwen2.5-VL,
151669–153716 on Qwen3-VL: the ids of <robot_action_0..2047> in StarVLA's -Action tokenizers) is taken here as the ids
of <robot_action_0..2047> in the tiny tokenizer.

Not reproduced (no torchvision / qwen_vl_utils here): `process_vision_info`'s own resize (a no-op at the 56×56 views,
a multiple of 28) and the Qwen processor's class itself; its text side (each <|image_pad|> repeated
grid_t·grid_h·grid_w / merge² times, then tokenised with padding) and image side (the image processor on the flat list
of PIL views) are done by hand. StarVLA runs the VLM under bf16 autocast; this comparison is in fp32.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES
from PIL import Image
from scipy.fft import dct, idct
from test_convert_starvla import to_starvla
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.action_tokenizers import FASTTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

COT = ("Your task is {instruction}. To identify the key objects for your task. "
       "Locate their bounding boxes in [x1,y1,x2,y2] format.")  # the released OXE / LIBERO CoT_prompt (§3)
H, A, S = 4, 7, 5  # horizon, action dim, state dim
SIZE = 56  # view side: a multiple of 28, so Qwen2.5's smart resize keeps it (Qwen3 rounds to 64 on both sides)
# different lengths, so that the batch of two is left-padded
INSTRUCTIONS = ["open the drawer", "pick up the red block and place it in the bowl next to the plate"]
NUM_FAST_ACTION_TOKENS = 2048  # StarVLA's -Action vocabularies: <robot_action_0> ... <robot_action_2047>
IGNORE = -100
TOL = dict(atol=1e-5, rtol=1e-5)


# ==================================================================================================== StarVLA reference


def sv_state_text(normalized_state: np.ndarray) -> str:
    """share_tools.state2str_transform + add_discretized_state_to_instruction: 256 uniform bins over [-1, 1]
    (`digitize(x, linspace(-1, 1, 257)[:-1]) - 1`), space-separated, between [STATE] and [ACTION]."""
    edges = np.linspace(-1.0, 1.0, 256 + 1)[:-1]
    bins = np.digitize(normalized_state, bins=edges) - 1
    return "[STATE] " + " ".join(str(b) for b in bins) + " [ACTION]"


def sv_oft_instruction(instruction: str, normalized_state, horizon: int, placeholder: str) -> str:
    """Qwenvl_OFT.forward / predict_action: optional state text, then the action-query suffix."""
    if normalized_state is not None:
        instruction = f"{instruction} {sv_state_text(normalized_state)}"
    return instruction + f" Please predict the next {horizon} robot actions: <action>{placeholder * horizon}<action>."


def sv_inputs(tokenizer, image_processor, views, instructions, cot=COT, solutions=None) -> dict:
    """QWen2_5._QWen_VL_Interface.build_qwenvl_inputs (QWen3 is the same through apply_chat_template(tokenize=True)):
    one chat per sample, user content = images then the CoT-substituted text, optional assistant turn with the
    solution, template applied with add_generation_prompt=True *always*, processor(text, images, padding=True) with
    left padding. The processor's work is done by hand (see the module docstring)."""
    flat = [Image.fromarray(view) for sample in views for view in sample]
    pixels = image_processor(images=flat, return_tensors="pt")
    merge = image_processor.merge_size
    counts = iter((pixels["image_grid_thw"].prod(-1) // merge**2).tolist())
    texts = []
    for b, (sample, instruction) in enumerate(zip(views, instructions)):
        content = [{"type": "image"} for _ in sample] + [{"type": "text", "text": cot.replace("{instruction}", instruction)}]
        messages = [{"role": "user", "content": content}]
        if solutions is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": solutions[b]}]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = text.split("<|image_pad|>")
        texts.append(pieces[0] + "".join("<|image_pad|>" * next(counts) + piece for piece in pieces[1:]))
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"], "texts": texts}  # fmt: skip


def sv_vlm(flat_state_dict: dict, vlm_config):
    """`qwen_vl_interface.model`: the family's *ForConditionalGeneration with the checkpoint's VLM weights."""
    prefix = "qwen_vl_interface.model."
    vlm = AutoModelForImageTextToText.from_config(vlm_config)
    vlm.load_state_dict({k[len(prefix):]: v for k, v in flat_state_dict.items() if k.startswith(prefix)}, strict=True)
    return vlm.float().eval()


def sv_mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id: int, merge: int) -> torch.Tensor:
    """The 3-D (t, h, w) rotary positions that StarVLA's pinned transformers (4.57) computes from `input_ids` in
    Qwen2_5_VLModel.get_rope_index / Qwen3VLModel.get_rope_index, for still images (grid t = 1): a text token
    advances all three axes by one; an image's tokens get (start, start + row, start + column) over its merged grid;
    the text after it resumes at the largest of those + 1. Padding (left) is skipped.

    Passed explicitly, so the reference does not depend on how transformers 5 finds the image tokens: there the
    3-D positions come from `mm_token_type_ids`, and a Qwen2.5-VL forward without them silently falls back to 1-D
    positions (Qwen3-VL raises)."""
    batch, length = input_ids.shape
    positions = torch.ones(3, batch, length, dtype=torch.long)
    grids = iter(image_grid_thw.tolist())
    for b in range(batch):
        keep = attention_mask[b].bool()
        ids, rows, nxt, i = input_ids[b][keep].tolist(), [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                rows.append((nxt, nxt, nxt))
                nxt, i = nxt + 1, i + 1
                continue
            t, h, w = next(grids)
            assert t == 1, "still images only"
            h, w = h // merge, w // merge
            rows += [(nxt, nxt + r, nxt + c) for r in range(h) for c in range(w)]
            nxt, i = nxt + max(h, w), i + h * w
        positions[:, b, keep] = torch.tensor(rows).T
    return positions


def sv_vlm_forward(vlm, inputs: dict, **kwargs):
    # QWen2_5 forward passes exactly these (plus labels); QWen3 passes the processor's dict as is.
    config = vlm.config
    position_ids = sv_mrope_position_ids(inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"],
                                         config.image_token_id, config.vision_config.spatial_merge_size)  # fmt: skip
    return vlm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=position_ids,
               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], **kwargs)  # fmt: skip


def sv_gather(last_hidden: torch.Tensor, input_ids: torch.Tensor, token_id: int, horizon: int) -> torch.Tensor:
    """Qwenvl_OFT._gather_action_token_embeddings: the last `horizon` placeholder positions, in position order."""
    batch, length, width = last_hidden.shape
    hit = input_ids == token_id
    assert bool((hit.sum(1) >= horizon).all()), "StarVLA raises when a sample has fewer than H placeholders"
    positions = torch.where(hit, torch.arange(length).expand(batch, length), torch.full_like(input_ids, -1))
    chosen = positions.topk(horizon, dim=-1).values.sort(dim=-1).values
    return last_hidden.gather(1, chosen[..., None].expand(-1, -1, width))


def sv_mlp_resnet(x: torch.Tensor, sd: dict, num_blocks: int = 2) -> torch.Tensor:
    """MLP_ActionHeader.L1RegressionActionHead.predict_action → MLPResNet.forward (OpenVLA-OFT's), per token.
    nn.LayerNorm defaults: eps 1e-5, affine."""
    def w(name):
        return sd[f"action_model.model.{name}"]

    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], w(f"{name}.weight"), w(f"{name}.bias"), eps=1e-5)

    def linear(h, name):
        return F.linear(h, w(f"{name}.weight"), w(f"{name}.bias"))

    flat = x.reshape(-1, x.shape[-1])  # (B * H, Hd), as StarVLA reshapes
    h = torch.relu(linear(norm(flat, "layer_norm1"), "fc1"))
    for i in range(num_blocks):  # MLPResNetBlock: identity + ReLU(Linear(LayerNorm(x)))  (pre-LN, ReLU inside)
        h = h + torch.relu(linear(norm(h, f"mlp_resnet_blocks.{i}.ffn.0"), f"mlp_resnet_blocks.{i}.ffn.1"))
    out = linear(norm(h, "layer_norm2"), "fc2")
    return out.view(*x.shape[:-1], -1)


def sv_masked_l1(prediction, target, mask=None):
    """QwenOFT.masked_l1_loss (older StarVLA: nn.L1Loss(), i.e. the unmasked mean)."""
    error = (prediction - target).abs()
    if mask is None:
        return error.mean()
    assert mask.shape == error.shape, "StarVLA raises on a mask that is not [B, H, D]"
    valid = mask.to(error.dtype)
    return (error * valid).sum() / valid.sum()


def pi_fast_encode(bpe: PreTrainedTokenizerFast, chunks: np.ndarray, scale: float, min_token: int) -> list:
    """physical-intelligence/fast UniversalActionProcessor.__call__: DCT over time (ortho), ×scale, round, shift by
    min_token (clipped at 0), one character per coefficient (time-major), BPE."""
    coefficients = np.around(dct(chunks, axis=1, norm="ortho") * scale)
    strings = ["".join(map(chr, np.maximum(c.flatten() - min_token, 0).astype(int))) for c in coefficients]
    return [bpe(s)["input_ids"] for s in strings]


def pi_fast_decode(bpe, sequences, time_horizon, action_dim, scale, min_token) -> np.ndarray:
    """UniversalActionProcessor.decode: a sequence that fails (None, wrong length, ...) decodes to zeros."""
    chunks = []
    for ids in sequences:
        try:
            coefficients = (np.array([ord(c) for c in bpe.decode(ids)]) + min_token).reshape(-1, action_dim)
            assert coefficients.shape == (time_horizon, action_dim)
        except Exception:
            coefficients = np.zeros((time_horizon, action_dim))
        chunks.append(idct(coefficients / scale, axis=0, norm="ortho"))
    return np.stack(chunks)


def sv_fast_labels(input_ids: torch.Tensor, action_min: int, action_max: int, pad_id: int) -> torch.Tensor:
    """QWen2_5/QWen3 build_qwenvl_inputs with solutions: mask everything before the first action-range id (the whole
    row if none), then every pad token."""
    labels = input_ids.clone()
    for row in labels:
        hits = ((row >= action_min) & (row <= action_max)).nonzero()
        if len(hits):
            row[: hits[0, 0]] = IGNORE
        else:
            row[:] = IGNORE
    labels[labels == pad_id] = IGNORE
    return labels


def sv_extract_fast_ids(generated: torch.Tensor, action_min: int, action_max: int) -> list:
    """Qwenvl_Fast._extract_action_token_ids + _decode_action_tokens: every id of the (prompt + reply) sequence in the
    action range, in order, minus ACTION_MIN; None when there is none."""
    out = []
    for row in generated.tolist():
        ids = [t - action_min for t in row if action_min <= t <= action_max]
        out.append(ids or None)
    return out


# ==================================================================================================== fixtures


def make_views(seed, batch=2, cameras=2):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(cameras)] for _ in range(batch)]


@pytest.fixture(scope="module", params=FAMILIES)
def oft(request, tiny_vlm_dirs):
    vlm_dir = tiny_vlm_dirs[request.param]
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="oft", action_dim=A, action_horizon=H, state_dim=S,
                                     prompt_template=COT)  # fmt: skip
    with torch.no_grad():  # a non-trivial head: LayerNorm affines and biases away from their init values
        for name, p in model.action_head.named_parameters():
            if "norm" in name or "ffn.0" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[SIZE, SIZE])
    rng = np.random.default_rng(0)
    processor.compute_norm_stats("bridge", rng.normal(size=(256, A)), rng.normal(size=(256, S)))
    rng = np.random.default_rng(1)
    views = make_views(2)
    batch = processor(images=views, text=INSTRUCTIONS, state=rng.normal(size=(2, S)),
                      actions=rng.normal(size=(2, H, A)), return_tensors="pt")  # fmt: skip
    return request.param, model, processor, views, batch


@pytest.fixture(scope="module")
def oft_reference(oft):
    """StarVLA's inputs, hidden states and predictions for the OFT batch, from the StarVLA-named weights."""
    _, model, processor, views, batch = oft
    sd = to_starvla(model.state_dict(), "oft")
    instructions = [sv_oft_instruction(text, batch["state"][b].numpy(), H, model.config.action_token)
                    for b, text in enumerate(INSTRUCTIONS)]  # fmt: skip
    inputs = sv_inputs(processor.tokenizer, processor.image_processor, views, instructions)
    vlm = sv_vlm(sd, model.config.vlm_config)
    with torch.no_grad():
        last_hidden = sv_vlm_forward(vlm, inputs, output_hidden_states=True, return_dict=True).hidden_states[-1]
        queries = sv_gather(last_hidden, inputs["input_ids"], model.config.action_token_id, H)
        predicted = sv_mlp_resnet(queries, sd)
    return sd, inputs, predicted


# ==================================================================================================== OFT


def test_oft_prompt_matches_starvla(oft, oft_reference):
    """Same text (state bins, suffix, CoT substitution, chat turns), same left-padded ids, same pixels."""
    _, model, processor, _, batch = oft
    _, inputs, _ = oft_reference
    assert model.config.action_token == "<|fim_pad|>"  # hf_vla's default placeholder; StarVLA's is "🔍" (see top)
    for b in range(2):
        ours = processor.tokenizer.decode(batch["input_ids"][b][batch["attention_mask"][b].bool()])
        assert ours == inputs["texts"][b]
        state_text = sv_state_text(batch["state"][b].numpy())
        assert (f"Your task is {INSTRUCTIONS[b]} {state_text} Please predict the next {H} robot actions: <action>"
                + "<|fim_pad|>" * H + "<action>.. To identify") in ours  # fmt: skip
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()  # left-padded, lengths differ
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    assert torch.equal(batch["attention_mask"], inputs["attention_mask"])
    assert torch.equal(batch["image_grid_thw"], inputs["image_grid_thw"])
    torch.testing.assert_close(batch["pixel_values"], inputs["pixel_values"], atol=1e-6, rtol=0)


def test_oft_head_is_starvla_mlp_resnet(oft, oft_reference):
    """Key set and shapes of StarVLA's L1RegressionActionHead: 2 blocks, width 2·Hd, output D."""
    _, model, _, _, _ = oft
    sd, _, _ = oft_reference
    hd = model.config.vlm_config.get_text_config().hidden_size
    head = {k[len("action_model.model."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("action_model.")}
    expected = {"layer_norm1.weight": (hd,), "layer_norm1.bias": (hd,), "fc1.weight": (2 * hd, hd),
                "fc1.bias": (2 * hd,), "layer_norm2.weight": (2 * hd,), "layer_norm2.bias": (2 * hd,),
                "fc2.weight": (A, 2 * hd), "fc2.bias": (A,)}  # fmt: skip
    for i in range(2):
        expected.update({f"mlp_resnet_blocks.{i}.ffn.0.weight": (2 * hd,), f"mlp_resnet_blocks.{i}.ffn.0.bias": (2 * hd,),
                         f"mlp_resnet_blocks.{i}.ffn.1.weight": (2 * hd, 2 * hd),
                         f"mlp_resnet_blocks.{i}.ffn.1.bias": (2 * hd,)})  # fmt: skip
    assert head == expected


def test_oft_predict_action_matches_starvla(oft, oft_reference):
    _, model, _, _, batch = oft
    _, _, predicted = oft_reference
    inputs = {k: v for k, v in batch.items() if k not in ("actions", "action_mask")}
    torch.testing.assert_close(model.predict_action(**inputs), predicted, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).actions, predicted, **TOL)


def test_oft_l1_loss_matches_starvla(oft, oft_reference):
    _, model, _, _, batch = oft
    _, _, predicted = oft_reference
    with torch.no_grad():
        loss = model(**batch).loss
    torch.testing.assert_close(loss, sv_masked_l1(predicted, batch["actions"]), **TOL)
    # a cell mask [B, H, D]: the second sample's last step ends the episode, the last dimension is padding
    mask = torch.ones(2, H, A, dtype=torch.bool)
    mask[1, -1] = False
    mask[:, :, -1] = False
    with torch.no_grad():
        masked = model(**{**batch, "action_mask": mask.float()}).loss
    torch.testing.assert_close(masked, sv_masked_l1(predicted, batch["actions"], mask), **TOL)
    # hf_vla also takes a step mask [B, H] (StarVLA only [B, H, D]): the same as the step mask expanded over D
    steps = torch.ones(2, H)
    steps[1, -1] = 0
    with torch.no_grad():
        step_loss = model(**{**batch, "action_mask": steps}).loss
    torch.testing.assert_close(step_loss, sv_masked_l1(predicted, batch["actions"], steps.bool()[..., None].expand(-1, -1, A)),
                               **TOL)  # fmt: skip


def test_oft_gather_takes_placeholders_not_padding(oft, oft_reference):
    """The gathered positions are the H placeholder positions of each row, after that row's left padding."""
    _, model, _, _, batch = oft
    _, inputs, _ = oft_reference
    ids = inputs["input_ids"]
    for b in range(2):
        positions = (ids[b] == model.config.action_token_id).nonzero().flatten()
        assert len(positions) == H and bool((positions[1:] - positions[:-1] == 1).all())  # one contiguous run
        assert int(positions[0]) > int((inputs["attention_mask"][b] == 0).sum())


def test_oft_extra_placeholders_differ_deliberately(oft):
    """StarVLA accepts more than H placeholders in a prompt (an instruction that contains the token) and silently
    takes the last H; hf_vla's processor refuses such an instruction and the model requires exactly H (deliberate)."""
    _, model, processor, views, _ = oft
    with pytest.raises(ValueError, match="reserved token"):
        processor(images=views[:1], text=[f"open {model.config.action_token} the drawer"], state=np.zeros((1, S)))


# ==================================================================================================== FAST


@pytest.fixture(scope="module", params=FAMILIES)
def fast(request, tiny_vlm_dirs, tmp_path_factory):
    vlm_dir = tiny_vlm_dirs[request.param]
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, H)[None, :, None]
    chunks = (rng.uniform(0.1, 0.6, (300, 1, A)) * np.sin(2 * np.pi * (t + rng.uniform(0, 1, (300, 1, A))))
              ).astype(np.float32)  # fmt: skip
    fast_tokenizer = FASTTokenizer.fit(chunks, scale=10, vocab_size=64)
    fast_dir = tmp_path_factory.mktemp(f"fast_{request.param}")
    fast_tokenizer.save_pretrained(fast_dir)
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="fast", action_dim=A, action_horizon=H,
                                     num_action_tokens=NUM_FAST_ACTION_TOKENS, action_tokenizer=fast_tokenizer,
                                     prompt_template=COT).eval()  # fmt: skip
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary"], image_size=[SIZE, SIZE])
    # identity normalisation (q01 = -1, q99 = 1), so the normalised targets are the fitted chunks themselves
    stats = {"mode": ["q99"] * A, "q01": [-1.0] * A, "q99": [1.0] * A, "mean": [0.0] * A, "std": [1.0] * A,
             "min": [-1.0] * A, "max": [1.0] * A}  # fmt: skip
    processor.set_norm_stats("bridge", {"action": stats})
    views = make_views(3, cameras=1)
    batch = processor(images=views, text=INSTRUCTIONS, actions=chunks[:2], return_tensors="pt")
    # the PI processor reads the BPE with transformers (AutoProcessor → AutoTokenizer on tokenizer.json)
    bpe = PreTrainedTokenizerFast.from_pretrained(fast_dir)
    return request.param, model, processor, views, batch, fast_tokenizer, bpe


@pytest.fixture(scope="module")
def fast_reference(fast):
    """StarVLA's training inputs, labels and loss for the FAST batch."""
    _, model, processor, views, batch, fast_tokenizer, bpe = fast
    tokenizer = processor.tokenizer
    action_min = tokenizer.convert_tokens_to_ids("<robot_action_0>")  # StarVLA: _ACTION_TOKEN_MIN (hard-coded)
    action_max = action_min + NUM_FAST_ACTION_TOKENS - 1  # _ACTION_TOKEN_MAX
    assert tokenizer.convert_tokens_to_ids(f"<robot_action_{NUM_FAST_ACTION_TOKENS - 1}>") == action_max
    fast_ids = pi_fast_encode(bpe, batch["actions"].numpy(), fast_tokenizer.scale, fast_tokenizer.min_token)
    solutions = ["".join(f"<robot_action_{k}>" for k in ids) for ids in fast_ids]  # map_fast_token_to_vlm_action
    inputs = sv_inputs(tokenizer, processor.image_processor, views, INSTRUCTIONS, solutions=solutions)
    labels = sv_fast_labels(inputs["input_ids"], action_min, action_max, tokenizer.pad_token_id)
    vlm = sv_vlm(to_starvla(model.state_dict(), "fast"), model.config.vlm_config)
    with torch.no_grad():
        out = sv_vlm_forward(vlm, inputs, labels=labels, return_dict=True)
    return dict(action_min=action_min, action_max=action_max, fast_ids=fast_ids, inputs=inputs, labels=labels,
                loss=out.loss, logits=out.logits, vlm=vlm)  # fmt: skip


def hf_vla_fast_training_rows(model, batch):
    """hf_vla's own training sequence and labels (VLATokenActionModel.append_targets), as forward builds them."""
    return model.append_targets(batch["input_ids"], batch["attention_mask"], batch["actions"])


def test_fast_action_ids_match_the_fast_processor(fast, fast_reference):
    _, model, _, _, batch, _, _ = fast
    assert model.encode_actions(batch["actions"].numpy()) == fast_reference["fast_ids"]


def test_fast_prompt_prefix_matches_starvla(fast, fast_reference):
    """Up to and including the action span, hf_vla's training sequence is StarVLA's (same conditioning)."""
    _, model, processor, _, batch, _, _ = fast
    ids, mask, _ = hf_vla_fast_training_rows(model, batch)
    ref = fast_reference["inputs"]
    for b, fast_ids in enumerate(fast_reference["fast_ids"]):
        ours = ids[b][mask[b].bool()].tolist()
        theirs = ref["input_ids"][b][ref["attention_mask"][b].bool()].tolist()
        start = theirs.index(fast_reference["action_min"] + fast_ids[0])
        end = start + len(fast_ids)
        assert theirs[start:end] == [fast_reference["action_min"] + k for k in fast_ids]
        assert ours[:end] == theirs[:end], processor.tokenizer.decode(theirs)


def test_fast_supervised_tokens_differ_from_starvla_only_by_its_trailing_header(fast, fast_reference):
    """Which tokens carry a label. StarVLA: from the first action id to the end, i.e. the action span, <|im_end|>,
    and — the §1.1 quirk — the `\\n<|im_start|>assistant\\n` that add_generation_prompt=True appends after the
    finished reply (4 tokens with Qwen's real tokenizer: 198, 151644, 77091, 198; 7 in the tiny one). hf_vla: the
    action span and <|im_end|> only (deliberate: the loss is on the reply, and a model trained StarVLA's way learns to
    open a new assistant turn after its reply). Everything else agrees, so StarVLA's loss is the token mean over these
    labels plus the header's (test_fast_loss_on_hf_vla_labels_matches_starvla_logits)."""
    _, model, processor, _, batch, _, _ = fast
    _, _, labels = hf_vla_fast_training_rows(model, batch)
    for b in range(2):
        ours = [t for t in labels[b].tolist() if t != IGNORE]
        theirs = [t for t in fast_reference["labels"][b].tolist() if t != IGNORE]
        assert ours[: -1] == [fast_reference["action_min"] + k for k in fast_reference["fast_ids"][b]]
        assert ours[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id
        assert theirs[: len(ours)] == ours
        assert processor.tokenizer.decode(theirs[len(ours):]) == "\n<|im_start|>assistant\n"


def test_fast_loss_on_hf_vla_labels_matches_starvla_logits(fast, fast_reference):
    """StarVLA's logits scored on hf_vla's labelled tokens (action span + <|im_end|>) give hf_vla's loss exactly:
    the forward pass and the reduction (token mean over the batch) agree; only the label coverage differs."""
    _, model, _, _, batch, _, _ = fast
    with torch.no_grad():
        loss = model(**batch).loss
    _, _, our_labels = hf_vla_fast_training_rows(model, batch)
    logits, labels = fast_reference["logits"], fast_reference["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(2):
        n = int((our_labels[b] != IGNORE).sum())  # hf_vla's count: the first n of StarVLA's labelled tokens
        first = int((labels[b] != IGNORE).nonzero()[0, 0])
        keep[b, first : first + n] = True
    shifted = keep[:, 1:]
    restricted = F.cross_entropy(logits[:, :-1][shifted].float(), labels[:, 1:][shifted])
    torch.testing.assert_close(loss, restricted, **TOL)
    # and StarVLA's own loss is that same mean taken over all its labelled tokens
    everything = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(everything, fast_reference["loss"], **TOL)


def test_fast_decoding_of_a_reply_matches_starvla(fast, fast_reference, monkeypatch):
    """Given the same generated ids, hf_vla's tokens and actions are StarVLA's. hf_vla's decoding is constrained to
    action tokens + <|im_end|> (deliberate), so a reply is action ids, then <|im_end|> padding; StarVLA keeps every
    action-range id of the whole sequence, which for such replies is the same list."""
    _, model, _, _, batch, fast_tokenizer, bpe = fast
    eos, offset = model.config.eos_token_id, fast_reference["action_min"]
    replies = [[offset + k for k in ids] for ids in fast_reference["fast_ids"]]
    width = max(len(r) for r in replies) + 1
    replies = torch.tensor([r + [eos] * (width - len(r)) for r in replies])
    prompt = {k: v for k, v in batch.items() if k != "actions"}

    def generate(input_ids, **kwargs):  # what HF generate returns: prompt + reply
        return torch.cat([input_ids, replies], dim=1)

    monkeypatch.setattr(model.vlm, "generate", generate)
    decoded = model.generate_actions(**prompt)
    theirs_ids = sv_extract_fast_ids(torch.cat([prompt["input_ids"], replies], dim=1), offset, fast_reference["action_max"])
    assert decoded.action_token_ids == theirs_ids == fast_reference["fast_ids"]
    theirs = pi_fast_decode(bpe, theirs_ids, H, A, fast_tokenizer.scale, fast_tokenizer.min_token)
    assert bool(decoded.valid.all())
    torch.testing.assert_close(decoded.actions, torch.from_numpy(theirs).float(), **TOL)
    torch.testing.assert_close(model.predict_action(**prompt), torch.from_numpy(theirs).float(), **TOL)


def test_fast_undecodable_reply_differs_deliberately(fast, fast_reference, monkeypatch):
    """A reply that is not a whole chunk (here: the first FAST id only) and an empty reply. StarVLA/FAST decode both to
    an all-zero chunk (decode catches the error; `None` for the empty one), which a robot would execute as 'no motion';
    hf_vla returns NaN rows and valid=False (deliberate: never a silent zero action). Same token extraction."""
    _, model, _, _, batch, fast_tokenizer, bpe = fast
    eos, offset = model.config.eos_token_id, fast_reference["action_min"]
    replies = torch.tensor([[offset + fast_reference["fast_ids"][0][0], eos], [eos, eos]])
    prompt = {k: v for k, v in batch.items() if k != "actions"}
    monkeypatch.setattr(model.vlm, "generate", lambda input_ids, **kw: torch.cat([input_ids, replies], dim=1))
    decoded = model.generate_actions(**prompt)
    theirs_ids = sv_extract_fast_ids(torch.cat([prompt["input_ids"], replies], dim=1), offset, fast_reference["action_max"])
    assert theirs_ids == [[fast_reference["fast_ids"][0][0]], None]
    assert decoded.action_token_ids == [[fast_reference["fast_ids"][0][0]], []]
    theirs = pi_fast_decode(bpe, theirs_ids, H, A, fast_tokenizer.scale, fast_tokenizer.min_token)
    assert np.array_equal(theirs, np.zeros((2, H, A)))
    assert not bool(decoded.valid.any()) and bool(decoded.actions.isnan().all())

"""LLaVA-style VLM chat data for co-training (the format StarVLA's VLM data uses).

Files are JSON (a list of items) or JSONL (one item per line, `.jsonl`):

    {"id": "0001",                                      # optional
     "image": "coco/0001.jpg",                          # or a list, or "images"; optional (text-only items)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red block."}]}

Roles: human → user, gpt → assistant, system → system ("user" / "assistant" and `{"role", "content"}` turns are
accepted too). Image paths are relative to `image_root`, by default the folder of the file that lists them.

TRL's conversational format (OpenAI-style messages, as in TRL's vision SFT examples) is read as well:

    {"images": ["coco/0001.jpg"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the table?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A red block."}]}]}

a content list becomes one string, each `{"type": "image"}` part an `<image>` placeholder in its place.

`load_vlm_chat(path)[i]` is `{"images": [uint8 [H, W, 3] RGB], "messages": [{"role", "content"}]}` with the
`<image>` placeholders kept in the content: one per image, in order. An item with images but no placeholder gets
one `<image>\\n` per image in front of its first user turn (LLaVA's convention).

`VLMChatCollator(processor)` turns a list of such samples into a training batch with `VLAProcessor.encode_chat`:
the tokenizer's chat template, images expanded to the backbone's image tokens, right padding, and labels only on
the assistant replies (each reply's tokens and its end-of-turn token; the assistant header is not learnt).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_vlm_chat(path_or_paths, image_root=None, check_images: bool = True) -> VLMChatDataset:
    """Reads one or more LLaVA- or TRL-style JSON / JSONL files into one dataset (items in file order).

    `check_images`: make sure every image file exists now (one `stat` per image), rather than when a DataLoader
    worker first reads the item, possibly hours into a co-training run."""
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    if not paths:
        raise ValueError("load_vlm_chat: no files given")
    items = []
    for path in map(Path, paths):
        root = Path(image_root) if image_root is not None else path.parent
        for position, raw in enumerate(_read_items(path)):
            source = f"{path} item {position}"
            items.append(_parse_item(raw, root, source))
    if check_images:
        missing = [(image, item["source"]) for item in items for image in item["images"] if not image.is_file()]
        if missing:
            listed = "; ".join(f"{image} ({source})" for image, source in missing[:3])
            more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
            where = image_root if image_root is not None else "the folder of each data file"
            raise FileNotFoundError(f"{len(missing)} image file(s) not found: {listed}{more} (image paths are "
                                    f"relative to {where}; check_images=False defers this to reading)")
    return VLMChatDataset(items)


class VLMChatDataset(Dataset):
    """Parsed chat items; images are read from disk when an item is accessed."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"images": [_read_image(path, item["source"], index) for path in item["images"]],
                "messages": [dict(message) for message in item["messages"]]}

    def __repr__(self) -> str:
        with_images = sum(bool(item["images"]) for item in self.items)
        return f"VLMChatDataset({len(self)} conversations, {with_images} with images)"


class VLMChatCollator:
    """Chat samples → `processor.encode_chat(samples, max_length)` (a right-padded batch with labels)."""

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, samples: Sequence[Mapping]):
        return self.processor.encode_chat(list(samples), max_length=self.max_length)


# ---- reading ----
def _read_items(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"chat data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_number}: invalid JSON: {err}") from err
        return items
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(items).__name__}")
    return items


def _parse_item(raw, root: Path, source: str) -> dict:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected an object, got {type(raw).__name__}")
    if "video" in raw or "videos" in raw:
        raise ValueError(f"{source}: video items are not supported")
    given = {key: raw[key] for key in ("image", "images") if raw.get(key)}  # null or empty: none (uniform exports)
    if len(given) > 1:
        raise ValueError(f"{source}: both 'image' and 'images' hold images; give them under one key")
    images = next(iter(given.values()), [])
    images = [images] if isinstance(images, str) else list(images)
    if not all(isinstance(image, str) for image in images):
        raise ValueError(f"{source}: 'image' must be a path or a list of paths, got {images!r}")
    keys = [key for key in ("conversations", "messages") if raw.get(key) is not None]
    if len(keys) > 1:
        raise ValueError(f"{source}: both 'conversations' and 'messages'; give the turns under one key")
    key = keys[0] if keys else "conversations"
    turns = raw.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{source}: expected a non-empty 'conversations' (LLaVA) or 'messages' (TRL) list")
    messages = [_parse_turn(turn, f"{source} {key}[{t}]") for t, turn in enumerate(turns)]
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{source}: no assistant ('gpt') turn, so nothing to learn")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{source}: opens with an assistant ('gpt') turn that no prompt precedes; drop that turn "
                         "or put a user or system turn before it")
    placeholders = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)
    if images and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{source}: has images but no user turn to put them in")
        first_user["content"] = f"{IMAGE_PLACEHOLDER}\n" * len(images) + first_user["content"]
    elif placeholders != len(images):
        raise ValueError(f"{source}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    return {"images": [root / image for image in images], "messages": messages, "source": source}


def _parse_turn(turn, field: str) -> dict:
    if not isinstance(turn, Mapping):
        raise ValueError(f"{field}: expected an object, got {type(turn).__name__}")
    # a uniform export writes the unused key of the other format as null
    role = turn["from"] if turn.get("from") is not None else turn.get("role")
    content = turn["value"] if turn.get("value") is not None else turn.get("content")
    if role not in ROLES:
        raise ValueError(f"{field}: unknown role {role!r}; expected one of {sorted(ROLES)}")
    if isinstance(content, list):
        content = "".join(_content_part_text(part, f"{field}.content[{k}]") for k, part in enumerate(content))
    if not isinstance(content, str):
        raise ValueError(f"{field}: expected a string 'value' / 'content' or a list of content parts, got "
                         f"{type(content).__name__}")
    return {"role": ROLES[role], "content": content}


def _content_part_text(part, field: str) -> str:
    """One `{"type": "text", "text"}` / `{"type": "image"}` part of a TRL-style message, as placeholder text."""
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "image":
        return IMAGE_PLACEHOLDER
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise ValueError(f"{field}: expected {{'type': 'text', 'text': str}} or {{'type': 'image'}}, got {part!r}")


def _read_image(path: Path, source: str, index: int) -> np.ndarray:
    from PIL import Image, ImageOps

    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path} (dataset index {index}, {source})")
    with Image.open(path) as image:  # upright, as transformers' load_image reads a photo's EXIF orientation
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


# ---- chat template helpers (used by VLAProcessor.encode_chat) ----
def chat_template_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages with `<image>` placeholders → chat-template messages: content holding images becomes a list of
    `{"type": "image"}` / `{"type": "text", "text"}` parts; text-only content stays a string."""
    out = []
    for message in messages:
        content = message["content"]
        if IMAGE_PLACEHOLDER in content:
            parts = []
            for k, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if k:
                    parts.append({"type": "image"})
                if text:
                    parts.append({"type": "text", "text": text})
            content = parts
        out.append({"role": message["role"], "content": content})
    return out


def render_with_reply_spans(messages: Sequence[Mapping], render: Callable) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation with `render(messages, add_generation_prompt)` (the untokenised chat template) and
    returns the text with the character span of each assistant reply: from the end of the assistant header through
    the end-of-turn marker, without the whitespace the template puts after it.

    Needs a template that renders the start of a conversation as the start of the whole (Qwen's and most do)."""
    chat = chat_template_messages(messages)
    full = render(chat, False)
    spans = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        if i == 0:  # its header would be the rendering of an empty conversation, which templates refuse
            raise ValueError("messages[0]: the conversation opens with an assistant turn; put a user or system turn "
                             "before it")
        header, turn = render(chat[:i], True), render(chat[: i + 1], False)
        if not (turn.startswith(header) and full.startswith(turn)):
            raise ValueError(f"messages[{i}]: the chat template does not render this conversation turn by turn "
                             "(a prefix renders differently), so the assistant replies cannot be located")
        spans.append((len(header), len(header) + len(turn[len(header):].rstrip())))
    return full, spans


def spans_after_expansion(text: str, spans, token: str, counts: Sequence[int]) -> list[tuple[int, int]]:
    """Character spans of `text` moved to where they land once the k-th `token` is repeated `counts[k]` times."""
    starts = [match.start() for match in re.finditer(re.escape(token), text)]

    def moved(position: int) -> int:
        return position + len(token) * sum(count - 1 for start, count in zip(starts, counts) if start < position)

    return [(moved(start), moved(end)) for start, end in spans]


def _write_demo(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("table.png", "drawer.png"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / name)
    items = [
        {"id": "a", "image": "table.png", "conversations": [
            {"from": "human", "value": "What is on the table?"}, {"from": "gpt", "value": "A red block."},
            {"from": "human", "value": "And left of it?"}, {"from": "gpt", "value": "A bowl."}]},
        {"id": "b", "images": ["table.png", "drawer.png"], "conversations": [
            {"from": "human", "value": "<image> then <image>: what changed?"},
            {"from": "gpt", "value": "The drawer opened."}]},
    ]
    path = root / "chat.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


if __name__ == "__main__":
    import torch

    from ..processing_vla import VLAProcessor
    from ..testing import build_image_processor, build_tiny_tokenizer, scratch_dir

    dataset = load_vlm_chat(_write_demo(scratch_dir("vlm_chat_demo_")))
    print(dataset)
    for i in range(len(dataset)):
        sample = dataset[i]
        print(f"[{i}] images {[list(image.shape) for image in sample['images']]} messages {sample['messages']}")
    processor = VLAProcessor(build_image_processor(), build_tiny_tokenizer(), image_size=[56, 56])
    batch = VLMChatCollator(processor)([dataset[i] for i in range(len(dataset))])
    print({key: list(value.shape) for key, value in batch.items()})
    labels = batch["labels"][1]
    print("learnt text of sample 1:", repr(processor.tokenizer.decode(labels[labels != -100])))
    print("image tokens per sample:", (batch["mm_token_type_ids"] == 1).sum(-1).tolist(),
          "grid tokens:", (torch.as_tensor(batch["image_grid_thw"]).prod(-1) // 4).tolist())

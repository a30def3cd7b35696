"""Faster CPU inference: `nn.Linear` layers that run oneDNN on a weight packed once, instead of MKL's sgemm.

On CPU, torch runs a float32 `nn.Linear` through MKL, which re-packs the weight into its kernel's layout on every call.
That cost is paid per call whatever the number of input rows, so it weighs most on what a policy runs many times on
few rows: a flow-matching head's denoising steps see 16–49 action tokens. oneDNN (the kernels torch ships for
inductor's CPU path, `torch.ops.mkldnn`) can keep the packed weight between calls. Measured side by side with
`benchmarks/flow_steps.py --config default-heads [--pack-linear-weights]` on this project's 2-core AMD EPYC: a
denoising step of StarVLA's default heads 1.4–2.3× faster, the backbone forward 1.2–1.4× faster, `predict_action`
with 10 steps 1.4–1.8× faster.

`pack_linear_weights(model)` turns every large enough `nn.Linear` of `model` into a `PackedLinear`: the same module
with the same parameters and state-dict keys, whose inference calls (no autograd, float32 on CPU) use a packed copy of
the weight, made on first use and remade when the weight is replaced or changed by an in-place op (its storage or
version counter moves, as after `load_state_dict` or an optimizer step). Edits through `weight.data` (PEFT's
`merge_adapter`, some distributed wrappers) and in-place edits of weights made under `torch.inference_mode` move
neither: call `pack_linear_weights` again after them, which drops every packed copy. Every other call — training,
bf16, CUDA, `torch.compile` tracing — runs `nn.Linear`'s own forward. The copy costs the layer's weight memory a second
time, hence opt-in; small layers (below `min_weight_numel`, where oneDNN's fixed cost per call exceeds MKL's packing)
are left as they are. `unpack_linear_weights(model)` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MIN_WEIGHT_NUMEL = 1 << 17  # 256 × 512: below this oneDNN's per-call cost outweighs MKL's packing (measured)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """`nn.Linear` whose inference calls run oneDNN on a cached packed weight (see the module docstring)."""

    _packed: tuple | None = None  # ((weight storage pointer, weight version), packed oneDNN weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._can_use_packed(input, self.weight):
            return F.linear(input, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(input, self._packed_weight(input), self.bias, "none", [], "")

    def forward_gelu_tanh(self, input: torch.Tensor) -> torch.Tensor:
        """`gelu(self(input), approximate="tanh")`, the GELU fused into the oneDNN kernel when the packed path runs
        (a separate GELU pass over a feed-forward's 4×-wide activations costs as much as a tenth of a DiT step)."""
        if not self._can_use_packed(input, self.weight):
            return F.gelu(F.linear(input, self.weight, self.bias), approximate="tanh")
        return torch.ops.mkldnn._linear_pointwise(input, self._packed_weight(input), self.bias, "gelu", [], "tanh")

    def _packed_weight(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        key = (weight.data_ptr(), None if weight.is_inference() else weight._version)  # inference tensors have none
        packed = self._packed
        if packed is None or packed[0] != key:
            rows = input.numel() // max(input.shape[-1], 1)
            packed = self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(rows, 1)))
        return packed[1]

    @staticmethod
    def _can_use_packed(input: torch.Tensor, weight: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
            return False
        if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
            return False
        return (
            input.device.type == "cpu"
            and weight.device.type == "cpu"
            and input.dtype == weight.dtype == torch.float32
            and type(input) is torch.Tensor
            and type(weight) in (torch.Tensor, nn.Parameter)
        )

    def _apply(self, fn, recurse=True):
        self._packed = None  # .to(), .half(), .cuda() ...: the weight is about to change or move
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # the packed weight is an opaque oneDNN tensor that can be neither copied nor pickled; it is remade on use
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        return state


def pack_linear_weights(model: nn.Module, min_weight_numel: int | None = None) -> int:
    """Make every plain `nn.Linear` of `model` with at least `min_weight_numel` weights (default
    `DEFAULT_MIN_WEIGHT_NUMEL`) a `PackedLinear`, in place, and drop the packed copies of layers that already are (they
    are remade from the current weights on use). Returns how many layers were converted. Raises RuntimeError when this
    torch build has no oneDNN."""
    if not onednn_available():
        raise RuntimeError("pack_linear_weights: this torch build has no oneDNN (torch.backends.mkldnn) kernels")
    if min_weight_numel is None:
        min_weight_numel = DEFAULT_MIN_WEIGHT_NUMEL
    converted = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module._packed = None
        elif type(module) is nn.Linear and module.weight.numel() >= min_weight_numel:
            module.__class__ = PackedLinear
            converted += 1
    return converted


def unpack_linear_weights(model: nn.Module) -> int:
    """Turn every `PackedLinear` of `model` back into a plain `nn.Linear` and free its packed weight."""
    restored = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__dict__.pop("_packed", None)
            module.__class__ = nn.Linear
            restored += 1
    return restored


if __name__ == "__main__":
    layer = nn.Linear(1024, 4096)
    x = torch.randn(16, 1024)
    with torch.no_grad():
        reference = layer(x)
        print("packed", pack_linear_weights(layer), "layer; max |Δ| vs MKL", (layer(x) - reference).abs().max().item())

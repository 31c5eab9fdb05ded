"""Weight layouts for decoding one token at a time.

A decode step feeds one token, so every Linear is a matrix-vector product: it reads its whole weight
for two FLOPs per weight, and the step is bound by memory traffic and by how many cores pull on it.
What was measured on a 2-core CPU (torch 2.13, GPT-2 Small shapes):

- fp32: a one-row matmul runs on one core and draws about half the memory bandwidth; a row-major
  (out, in) weight is slower still for the 50257-wide LM head. `torch.bmm` over a batch of two gives
  each core one half of the output columns, so `HalvesLinear` splits every fp32 Linear that way
  (bench/generate.py, greedy: 34.5 tokens/s before, 39-40 after).
- bf16: oneDNN, which PyTorch uses for bf16 matmuls on CPU, is compute-bound on one row (about 14
  GB/s for the LM head). PyTorch's own one-row bf16 kernel (fp32 accumulation, both cores) streams
  a row-major weight at about 40 GB/s, but it is only used with oneDNN switched off, and for a few
  rows or more it is far slower than oneDNN. `OneRowLinear` therefore switches oneDNN off around
  one-row products only (greedy: 47 tokens/s before, 87 after).

`optimize_for_decoding` applies this to a loaded model. The values of the weights do not change,
only their layout and the kernels that read them; both kinds of kernel accumulate in fp32, but in
another order, so the logits move in the last bits and a near-tie between two tokens can fall the
other way (random GPT-2 Small weights in bf16: the first 183 of 200 greedy tokens agreed).
Afterwards the model can only decode: the halved Linears hold their weights as buffers, not as the
parameters training and export expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kids.model import GPT2


class HalvesLinear(nn.Module):
    """`x @ weight.T + bias` with the output columns computed in two halves by one `torch.bmm`.

    `halves` is (2, in, half): the columns of weight.T for the first and the second half of the
    outputs. With an odd number of outputs the last column, `rest` (in, 1), is one extra matmul.
    """

    def __init__(self, halves: torch.Tensor, rest: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = halves.shape[1]
        self.out_features = 2 * halves.shape[2] + rest.shape[1]
        self.register_buffer("halves", halves)
        self.register_buffer("rest", rest)
        # The bias in the bmm's (2, 1, half) output shape, so baddbmm adds it in the same pass.
        half = halves.shape[2]
        self.register_buffer("bias_halves", None if bias is None else bias[:2 * half].reshape(2, 1, half))
        self.register_buffer("bias_rest", None if bias is None else bias[2 * half:])

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> HalvesLinear:
        """Copies the weight into contiguous halves (bmm streams those fastest)."""
        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        half = out_features // 2
        halves = weight[:2 * half].reshape(2, half, in_features).transpose(1, 2).contiguous()
        rest = weight[2 * half:].t().contiguous()
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(halves, rest, bias)

    @classmethod
    def over_columns(cls, columns: torch.Tensor) -> HalvesLinear:
        """Views of an (in, out) contiguous weight.T, for a weight shared with another module (tied LM head)."""
        in_features, out_features = columns.shape
        half = out_features // 2
        halves = columns[:, :2 * half].view(in_features, 2, half).transpose(0, 1)
        return cls(halves, columns[:, 2 * half:], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        both = rows.expand(2, *rows.shape)  # the same rows for each half: a view, no copy
        if self.bias_halves is not None:
            y = torch.baddbmm(self.bias_halves, both, self.halves)
        else:
            y = torch.bmm(both, self.halves)
        # (2, rows, half) -> (rows, 2 * half): a view for a single row, one small copy otherwise.
        y = y.transpose(0, 1).reshape(rows.shape[0], -1)
        if self.rest.shape[1] > 0:
            last = rows @ self.rest
            if self.bias_rest is not None:
                last = last + self.bias_rest
            y = torch.cat([y, last], dim=1)
        return y.view(*x.shape[:-1], self.out_features)


@contextmanager
def without_onednn() -> Iterator[None]:
    """PyTorch's native CPU kernels instead of oneDNN's while the block runs (a process-wide switch)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class OneRowLinear(nn.Linear):
    """An `nn.Linear` (same parameters) whose one-row products on CPU skip oneDNN (see the module docstring)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> OneRowLinear:
        one_row = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        one_row.weight = linear.weight  # the same Parameter: a tied weight stays tied
        one_row.bias = linear.bias
        return one_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.numel() == x.shape[-1]
        if not one_row or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        with without_onednn():
            return F.linear(x, self.weight, self.bias)


def optimize_for_decoding(model: GPT2) -> GPT2:
    """Lay out the weights for one-token steps (see the module's docstring); for a model that will only decode."""
    weight = model.transformer.wte.weight
    linears = [(parent, name) for block in model.transformer.h
               for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                    (block.mlp, "c_proj"))]
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        # Row-major throughout: what the bf16 CPU kernels and GPU kernels read fastest. Checkpoints
        # loaded from HF may arrive with transposed (column-major) Conv1D weights.
        for parent, name in [*linears, (model, "lm_head")]:
            linear = getattr(parent, name)
            if not linear.weight.is_contiguous():
                linear.weight.data = linear.weight.data.contiguous()
            if weight.device.type == "cpu":
                setattr(parent, name, OneRowLinear.from_linear(linear))
        return model
    for parent, name in linears:
        setattr(parent, name, HalvesLinear.from_linear(getattr(parent, name)))
    # The LM head shares its weight with the token embedding: one (n_embd, vocab) column-major copy
    # serves both, the embedding reading one (strided) row per token and the head its two halves.
    columns = weight.data.t().contiguous()
    weight.data = columns.t()
    model.lm_head = HalvesLinear.over_columns(columns)
    return model


__all__ = ["HalvesLinear", "OneRowLinear", "optimize_for_decoding", "without_onednn"]

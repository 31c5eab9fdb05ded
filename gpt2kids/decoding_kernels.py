"""Decoding kernels chosen by measurement on the machine that runs them.

A decode step feeds one token per sequence, so every Linear is a product with one row (batch 1) or
a few (batched decoding): it reads its whole weight for two FLOPs per weight, and the step is bound
by how fast the kernel streams the weights. Which PyTorch call streams fastest depends on the CPU,
on the oneDNN and BLAS builds inside torch and on the thread count, and it differs between the CPUs
this project runs on. So nothing here follows a CPU's name, flags or core count: the first time a
(shape, dtype) is needed, every candidate is timed on it, the fastest is kept, and the decision is
cached per machine (see `cache_file`). The candidates all compute `x @ W.T + b` with fp32
accumulation, only in another order:

- `linear`: `F.linear` on the row-major (out, in) weight, what the plain model runs (oneDNN for
  bf16, BLAS for fp32);
- `mv`: `torch.mv` / `torch.addmv` on the same weight, one row (in bf16 oneDNN's matmul with the
  weight as the left operand, in fp32 BLAS gemv);
- `cols`: a matmul against a column-major (in, out) copy;
- `split-P`: the output columns in P = `torch.get_num_threads()` blocks, (P, in, out/P), computed by
  one `baddbmm`, so that each thread streams one block;
- `bag-P`: the same blocks through `F.embedding_bag` with per-sample weights, one row: x @ W.T is
  the x-weighted sum of the rows of W.T, one bag per block, the bags in parallel. A native PyTorch
  kernel (fbgemm), reached without oneDNN and without `torch.backends.mkldnn.enabled`, a
  process-wide switch that is not safe to flip while other threads compute;
- `packed`: oneDNN's Linear on a weight reordered once into its own blocked format
  (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU backend calls).

A Linear holds its weight in one layout (`layouts`), which serves every number of rows: a one-row
input takes the layout's fastest kernel for one row, more rows its fastest for `FEW_ROWS` rows. The
layout kept is the one with the fastest one-row kernel, or one nearly as fast there that is faster
for more rows (`decide`). The tied LM head
keeps one copy of its weight, which the token embedding reads too. Timings run on synthetic weights
of the model's shapes, as many of each as the model holds, called in the model's order, so that the
weights come from memory (or cache) as in a decode step; passes of the candidates alternate, and each
figure is a median. A measurement during which other work used much of the CPUs is used but not cached.

`optimize_for_decoding` applies the decisions to a built model; `decoding_dtype` compares a decode
step's products in fp32 and bf16 for `--precision auto`. Afterwards the model can only decode: most
layouts hold the weights as buffers of their own, and `gpt2kids.hf.export` refuses the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kids.atomic_files import atomic_write_text
from gpt2kids.config import GPT2Config
from gpt2kids.device import DTYPES
from gpt2kids.model import GPT2

FEW_ROWS = 8  # batched decoding: the kernels for more than one row are timed at this many rows
BUSY_LIMIT = 0.25  # share of the machine's CPUs used by other work above which a measurement is not cached
ROUNDS = 2  # timed passes per kernel; the median over passes and copies is kept
PRUNE = 2.5  # after one timed round, kernels this many times slower than the best are not timed again
ONE_ROW_SLACK = 0.1  # a layout this much slower for one row than the fastest may still win on more rows
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CACHE_VERSION = 2


# --- layouts and kernels --------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearShape:
    out_features: int
    in_features: int
    bias: bool
    tied: bool  # the weight is shared with the token embedding (GPT-2's LM head)

    def key(self, dtype: torch.dtype) -> str:
        return (f"{dtype_name(dtype)} {self.out_features}x{self.in_features}"
                f"{' bias' if self.bias else ''}{' tied' if self.tied else ''}")

    def label(self) -> str:
        return f"{self.out_features}x{self.in_features}{' (tied head)' if self.tied else ''}"


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def layouts(tied: bool, parts: int | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """Each layout a weight can be held in: (its kernels for one row, its kernels for more rows).

    `rows`: the (out, in) weight as it is. `cols`: an (in, out) copy. `blocks-P`: (P, in [+ 1 for the
    bias], out/P), the output columns in P blocks. `packed`: oneDNN's own blocked format for a
    Linear (`torch.ops.mkldnn._reorder_linear_weight`, packed for `FEW_ROWS` rows). A tied weight
    keeps one copy for the head and the embedding: `rows`, or `cols-P`, (in, out) padded to P
    blocks, whose blocks are strided views (a packed copy could not serve the embedding).
    """
    parts = parts or torch.get_num_threads()
    split, bag = f"split-{parts}", f"bag-{parts}"
    if tied:
        return {"rows": (["linear", "mv"], ["linear"]), f"cols-{parts}": (["cols", split, bag], ["cols", split])}
    return {"rows": (["linear", "mv"], ["linear"]), "cols": (["cols"], ["cols"]),
            f"blocks-{parts}": ([split, bag], [split]), "packed": (["packed"], ["packed"])}


def kernel_parts(kernel: str) -> int:
    count = kernel.partition("-")[2]
    return int(count) if count else torch.get_num_threads()


def layout_for(kernel: str, tied: bool) -> str:
    """The layout in which `kernel` computes one row (split and bag: one block per thread unless given)."""
    name, _, count = kernel.partition("-")
    if name not in ("linear", "mv", "cols", "split", "bag", "packed") or (count and name not in ("split", "bag")):
        raise ValueError(f"unknown decoding kernel {kernel!r}")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"decoding kernel {kernel!r} needs a whole number of blocks")
    parts = kernel_parts(kernel)
    if name in ("linear", "mv") or (name == "packed" and tied):  # no packed copy of a shared weight
        return "rows"
    if name == "packed":
        return "packed"
    if tied:
        return f"cols-{parts}"
    return "cols" if name == "cols" else f"blocks-{parts}"


def forced_choice(force: str, tied: bool) -> tuple[str, str, str]:
    """(layout, one-row kernel, kernel for more rows) for `force`, "ONE" or "ONE/MORE".

    The layout is the one where ONE runs; MORE is used where that layout runs it, else the layout's
    first kernel for more rows (so "bag/cols" gives the tied head `cols` and other Linears `split`).
    `packed` gives a tied weight `linear`.
    """
    one, _, more = force.partition("/")
    layout = layout_for(one, tied)
    if more:
        layout_for(more, tied)  # a known name
    parts = int(layout.partition("-")[2] or torch.get_num_threads())
    one_kernels, more_kernels = layouts(tied, parts)[layout]
    one = next((kernel for kernel in one_kernels if kernel.partition("-")[0] == one.partition("-")[0]),
               one_kernels[0])
    matches = [kernel for kernel in more_kernels if kernel.partition("-")[0] == more.partition("-")[0]]
    return layout, one, matches[0] if matches else more_kernels[0]


def storage_shape(layout: str, shape: LinearShape) -> tuple[int, ...]:
    """The shape of the one tensor that holds a weight (and in `blocks-P`, its bias) in `layout`."""
    out_features, in_features = shape.out_features, shape.in_features
    name, _, count = layout.partition("-")
    if name in ("rows", "packed"):  # packed: the shape oneDNN's tensor reports
        return (out_features, in_features)
    if not count:
        return (in_features, out_features)
    parts = int(count)
    width = -(-out_features // parts)  # the last block is padded with zeros
    if name == "cols":
        return (in_features, parts * width)
    return (parts, in_features + shape.bias, width)


def lay_out(weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> torch.Tensor:
    """A copy of (out, in) `weight` in `layout` (`blocks-P` with the bias as the last row of each block)."""
    weight = weight.detach()
    if layout == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), FEW_ROWS)
    out_features, in_features = weight.shape
    shape = LinearShape(out_features, in_features, bias is not None, False)
    storage = weight.new_zeros(storage_shape(layout, shape))
    if layout == "rows":
        storage.copy_(weight)
    elif layout.startswith("cols"):
        storage[:, :out_features] = weight.t()
    else:
        parts, width = storage.shape[0], storage.shape[2]
        padded = torch.cat([weight, weight.new_zeros(parts * width - out_features, in_features)])
        storage[:, :in_features] = padded.view(parts, width, in_features).transpose(1, 2)
        if bias is not None:
            padded_bias = torch.cat([bias.detach(), bias.new_zeros(parts * width - out_features)])
            storage[:, in_features] = padded_bias.view(parts, width)
    return storage


class DecodingLinear(nn.Module):
    """`x @ W.T + b` with W in `layout`: one-row inputs by kernel `one_row`, more rows by `more_rows`.

    Built over a `storage` tensor (see `storage_shape`); `from_linear` makes one from an `nn.Linear`.
    """

    def __init__(self, storage: torch.Tensor, bias: torch.Tensor | None, shape: LinearShape, layout: str,
                 one_row: str, more_rows: str) -> None:
        super().__init__()
        self.in_features, self.out_features = shape.in_features, shape.out_features
        self.layout, self.one_row, self.more_rows = layout, one_row, more_rows
        one_kernels, more_kernels = layouts(shape.tied, kernel_parts(layout))[layout]
        if one_row not in one_kernels or more_rows not in more_kernels:
            raise ValueError(f"kernels {one_row}, {more_rows} do not run in layout {layout}")
        name = layout.partition("-")[0]
        in_features, device = shape.in_features, storage.device
        # Parameters stay parameters (so a tied weight stays tied); layouts of our own are buffers.
        if isinstance(bias, nn.Parameter) and name != "blocks":
            self.bias = bias
        else:  # `blocks` holds its bias in the storage
            self.register_buffer("bias", None if bias is None or name == "blocks" else bias.detach())
        if name == "rows":
            if isinstance(storage, nn.Parameter):
                self.weight = storage
            else:
                self.register_buffer("weight", storage)
            return
        if name == "packed":
            self.register_buffer("packed", storage)
            return
        self.register_buffer("storage", storage)
        self.parts = kernel_parts(layout)
        if name == "cols" and layout != "cols":
            width = storage.shape[1] // self.parts
            self.register_buffer("blocks", storage.view(in_features, self.parts, width).transpose(0, 1))
            self.register_buffer("bias_blocks", None)
            self.register_buffer("table", storage.view(in_features * self.parts, width))
            # Bag p sums the rows k * P + p of the table (k = 0 .. in - 1): block p of the output.
            order = torch.arange(in_features, device=device)[None, :] * self.parts
            self.register_buffer("indices", (order + torch.arange(self.parts, device=device)[:, None]).reshape(-1))
            self.register_buffer("offsets", torch.arange(0, self.parts * in_features, in_features, device=device))
            self.register_buffer("one", None)
        elif name == "blocks":
            rows = storage.shape[1]
            self.register_buffer("blocks", storage[:, :in_features])
            self.register_buffer("bias_blocks", storage[:, in_features:] if shape.bias else None)
            self.register_buffer("table", storage.view(self.parts * rows, storage.shape[2]))
            self.register_buffer("indices", torch.arange(self.parts * rows, device=device))
            self.register_buffer("offsets", torch.arange(0, self.parts * rows, rows, device=device))
            # The bias is the last row of every block, weighted by one: the bag adds it in its fp32 sum.
            self.register_buffer("one", storage.new_ones(1) if shape.bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str, one_row: str, more_rows: str,
                    embedding: nn.Embedding | None = None) -> DecodingLinear:
        """Hold `linear`'s weight in `layout`; `embedding`: the token embedding that shares it, if any.

        `rows` keeps the module's own parameters. The others copy the weight; a shared weight then
        lives in the one column-major copy, which the embedding reads through a strided view.
        """
        shape = LinearShape(linear.out_features, linear.in_features, linear.bias is not None, embedding is not None)
        if layout == "rows":
            if not linear.weight.is_contiguous():  # HF Conv1D weights may arrive transposed
                linear.weight.data = linear.weight.data.contiguous()
            return cls(linear.weight, linear.bias, shape, layout, one_row, more_rows)
        module = cls(lay_out(linear.weight, linear.bias, layout), linear.bias, shape, layout, one_row, more_rows)
        if embedding is not None:
            embedding.weight.data = module.storage[:, :shape.out_features].t()
        return module

    def compute(self, rows: torch.Tensor, kernel: str) -> torch.Tensor:
        """(R, in) -> (R, out) by `kernel`, one this layout runs (for a one-row kernel, R == 1)."""
        name = kernel.partition("-")[0]
        if name == "linear":
            return F.linear(rows, self.weight, self.bias)
        if name == "packed":
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        if name == "mv":
            vector = rows[0]
            if self.bias is None:
                return torch.mv(self.weight, vector)[None]
            return torch.addmv(self.bias, self.weight, vector)[None]
        if name == "cols":
            if self.bias is not None:  # `cols` (never padded); the tied `cols-P` has no bias
                return torch.addmm(self.bias, rows, self.storage)
            return (rows @ self.storage)[:, :self.out_features]
        if name == "split":
            stacked = rows.expand(self.parts, *rows.shape)  # the same rows for every block: a view
            if self.bias_blocks is None:
                out = torch.bmm(stacked, self.blocks)
            else:
                out = torch.baddbmm(self.bias_blocks, stacked, self.blocks)
            # (P, R, width) -> (R, P * width): a view for one row, a copy for more.
            return out.transpose(0, 1).reshape(rows.shape[0], -1)[:, :self.out_features]
        vector = rows[0] if self.one is None else torch.cat([rows[0], self.one])
        out = F.embedding_bag(self.indices, self.table, self.offsets, mode="sum",
                              per_sample_weights=vector.repeat(self.parts))
        return out.view(1, -1)[:, :self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        kernel = self.one_row if rows.shape[0] == 1 else self.more_rows
        return self.compute(rows, kernel).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"one row: {self.one_row}, more rows: {self.more_rows}")


# --- the model's shapes ---------------------------------------------------------------------------

def decoding_linears(model: GPT2) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear a decode step runs, the LM head last."""
    return [(parent, name) for block in model.transformer.h
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj"))] + [(model, "lm_head")]


def linear_shape(model: GPT2, linear: nn.Linear) -> LinearShape:
    tied = linear.weight is model.transformer.wte.weight
    return LinearShape(linear.out_features, linear.in_features, linear.bias is not None, tied)


def model_shapes(model: GPT2) -> dict[LinearShape, int]:
    """How many Linears of each shape a decode step runs."""
    counts: dict[LinearShape, int] = {}
    for parent, name in decoding_linears(model):
        shape = linear_shape(model, getattr(parent, name))
        counts[shape] = counts.get(shape, 0) + 1
    return counts


def config_shapes(config: GPT2Config) -> dict[LinearShape, int]:
    with torch.device("meta"):
        return model_shapes(GPT2(config))


# --- timing the candidates ------------------------------------------------------------------------

def families(shape: LinearShape) -> dict[str, str]:
    """The layout each family of kernels uses for `shape` (a tied weight has no packed copy)."""
    parts = torch.get_num_threads()
    if shape.tied:
        return {"rows": "rows", "cols": f"cols-{parts}", "blocks": f"cols-{parts}"}
    return {"rows": "rows", "cols": "cols", "blocks": f"blocks-{parts}", "packed": "packed"}


FAMILY_KERNELS = {  # family: (kernel names for one row, for more rows)
    "rows": (["linear", "mv"], ["linear"]), "cols": (["cols"], ["cols"]),
    "blocks": (["split", "bag"], ["split"]), "packed": (["packed"], ["packed"]),
}


def _named(kernels: list[str], name: str) -> str | None:
    return next((kernel for kernel in kernels if kernel.partition("-")[0] == name), None)


@torch.inference_mode()
def time_candidates(shapes: Mapping[LinearShape, int], dtype: torch.dtype) -> dict[LinearShape, dict[str, dict]]:
    """Median seconds per call of every kernel, per shape: {"1": {kernel: s}, "8": {kernel: s}}.

    A family of kernels at a time (`FAMILY_KERNELS`), every shape gets as many synthetic weights as
    the model holds, in the family's layout, and each timed round is a pass over them in the model's
    order, each call to the next weight (every other weight of a shape per round): the traffic of a
    decode step, whose weights come from memory, or from the cache when the model fits in it. The
    values are constant: none of these kernels depends on them. Untimed first calls take the kernels'
    set-up (oneDNN primitives, thread pools). After the first round, a kernel more than `PRUNE` times
    slower than the family's best for a shape is not timed again on it (its one figure stands). A
    layout or kernel that fails is left out.
    """
    rows_classes = {"1": None, str(FEW_ROWS): None}
    inputs = {(width, rows): torch.randn(int(rows), width).to(dtype)
              for shape in shapes for width in (shape.in_features,) for rows in rows_classes}
    # The calls of one pass in the model's order: a shape held n times is called at 1/n, 2/n, ... 1.
    order = sorted(((copy + 1) / count, index, copy) for index, count in enumerate(shapes.values())
                   for copy in range(count))
    listed = list(shapes)

    def pooled(layout: str, shape: LinearShape) -> tuple[int, ...]:  # what a weight takes from the pool
        return storage_shape("rows" if layout == "packed" else layout, shape)

    # One buffer serves every family in turn (filled once: fresh memory would be page-faulted in
    # during the timings); the tied weight's copy, which two families read, has its own.
    def is_shared(shape: LinearShape, layout: str) -> bool:
        return shape.tied and layout != "rows"

    pool = torch.full((max(sum(count * math.prod(pooled(layout, shape)) for shape, count in shapes.items()
                                for layout in [families(shape).get(family)]
                                if layout and not is_shared(shape, layout))
                            for family in FAMILY_KERNELS),), 0.01, dtype=dtype)
    samples: dict[tuple[LinearShape, str, str], list[float]] = {}
    shared: dict[tuple[LinearShape, str], list[DecodingLinear]] = {}
    for family, (one_names, more_names) in FAMILY_KERNELS.items():
        modules: dict[LinearShape, list[DecodingLinear]] = {}
        offset = 0
        for shape, count in shapes.items():
            layout = families(shape).get(family)
            if layout is None:
                continue
            if (shape, layout) in shared:
                modules[shape] = shared[shape, layout]
                continue
            one_kernels, more_kernels = layouts(shape.tied)[layout]
            bias = torch.full((shape.out_features,), 0.01, dtype=dtype) if shape.bias else None
            dims = pooled(layout, shape)
            if is_shared(shape, layout):
                storages = list(torch.full((count, *dims), 0.01, dtype=dtype).unbind())
            else:
                storages = list(pool[offset:offset + count * math.prod(dims)].view(count, *dims).unbind())
                offset += count * math.prod(dims)
            try:
                if layout == "packed":  # oneDNN's own copies, packed from row-major weights
                    storages = [lay_out(weight, None, layout) for weight in storages]
                modules[shape] = [DecodingLinear(storage, bias, shape, layout, one_kernels[0], more_kernels[0])
                                  for storage in storages]
            except (RuntimeError, AttributeError):  # e.g. a torch built without oneDNN has no packed layout
                continue
            if is_shared(shape, layout):
                shared[shape, layout] = modules[shape]
        tasks = [(rows, name) for rows, names in (("1", one_names), (str(FEW_ROWS), more_names)) for name in names]
        kernel_of: dict[tuple[LinearShape, str, str], str] = {}
        for shape, weights in modules.items():  # set-up calls, untimed
            one_kernels, more_kernels = layouts(shape.tied)[weights[0].layout]
            for rows, name in tasks:
                kernel = _named(one_kernels if rows == "1" else more_kernels, name)
                if kernel is None:
                    continue
                try:
                    weights[0].compute(inputs[shape.in_features, rows], kernel)
                except RuntimeError:
                    continue
                kernel_of[shape, rows, name] = kernel
                samples[shape, rows, kernel] = []
        for round_index in range(ROUNDS):
            for rows, name in tasks if round_index % 2 == 0 else tasks[::-1]:  # alternate the order
                for _, index, copy in order:
                    shape = listed[index]
                    kernel = kernel_of.get((shape, rows, name))
                    # Each round times every other copy of a shape held more than once (the others
                    # in the next round): half the calls, and still the model's traffic in between.
                    if kernel is None or (shapes[shape] > 1 and (copy + round_index) % 2):
                        continue
                    x, module = inputs[shape.in_features, rows], modules[shape][copy]
                    start = time.perf_counter()
                    module.compute(x, kernel)
                    samples[shape, rows, kernel].append(time.perf_counter() - start)
            if round_index == 0:  # drop the hopeless: their first figures stand
                first = {key: statistics.median(samples[key[0], key[1], kernel]) for key, kernel in kernel_of.items()}
                for shape, rows, name in list(kernel_of):
                    best = min(value for (other, other_rows, _), value in first.items()
                               if other == shape and other_rows == rows)
                    if first[shape, rows, name] > PRUNE * best:
                        del kernel_of[shape, rows, name]
        del modules
    timings: dict[LinearShape, dict[str, dict]] = {shape: {rows: {} for rows in rows_classes} for shape in shapes}
    for (shape, rows, kernel), values in samples.items():
        timings[shape][rows][kernel] = statistics.median(values)
    return timings


def decide(shape: LinearShape, timings: Mapping[str, Mapping[str, float]]) -> tuple[str, str, str]:
    """(layout, one-row kernel, kernel for more rows), each kernel the fastest of its rows class in the layout.

    One row (batch-1 decoding, the common case) comes first: the layout with the fastest one-row
    kernel is kept, unless another one within `ONE_ROW_SLACK` of it runs `FEW_ROWS` rows faster.
    """
    one, few = timings["1"], timings[str(FEW_ROWS)]
    parts = None
    for kernel in [*one, *few]:
        if kernel.partition("-")[2]:
            parts = kernel_parts(kernel)
    options = []  # (one-row seconds, more-rows seconds, layout, one-row kernel, more-rows kernel)
    for layout, (one_kernels, more_kernels) in layouts(shape.tied, parts).items():
        one_timed = [kernel for kernel in one_kernels if kernel in one]
        more_timed = [kernel for kernel in more_kernels if kernel in few]
        if one_timed and more_timed:
            one_best, more_best = min(one_timed, key=one.__getitem__), min(more_timed, key=few.__getitem__)
            options.append((one[one_best], few[more_best], layout, one_best, more_best))
    if not options:
        return "rows", "linear", "linear"  # nothing could be timed: what the plain model runs
    fastest = min(option[0] for option in options)
    close = [option for option in options if option[0] <= (1 + ONE_ROW_SLACK) * fastest]
    return min(close, key=lambda option: option[1])[2:]


# --- the cache ------------------------------------------------------------------------------------

def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """What the cache is keyed by. It only says where the decisions hold; they come from timings."""
    return {"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_file() -> Path:
    """$GPT2KIDS_CACHE (else ~/.cache/gpt2kids)/decoding-kernels/<hash of `machine()`>.json"""
    root = Path(os.environ.get("GPT2KIDS_CACHE", Path.home() / ".cache" / "gpt2kids"))
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return root / "decoding-kernels" / f"{digest}.json"


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: measured again and rewritten
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("machine") != machine():
        return {}
    shapes = data.get("shapes")
    return shapes if isinstance(shapes, dict) else {}


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, and steal), or None off Linux."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def foreign_share(run: Callable[[], object]) -> float:
    """Run `run`; the share of the machine's CPUs that other work used meanwhile (0 where unknown)."""
    busy, own, start = _busy_seconds(), time.process_time(), time.perf_counter()
    run()
    after, own_after, wall = _busy_seconds(), time.process_time(), time.perf_counter() - start
    if busy is None or after is None or wall <= 0:
        return 0.0
    return max(0.0, after - busy - (own_after - own)) / (wall * (os.cpu_count() or 1))


_lock = threading.Lock()
_uncached: dict[Path, dict[str, dict]] = {}  # decisions this process measured but could not cache


def ensure_measured(shapes: Mapping[LinearShape, int], dtypes: list[torch.dtype]) -> tuple[dict[str, dict], str]:
    """Every (shape, dtype)'s entry, from the cache or measured now, and a note on where they came from."""
    with _lock:
        path = cache_file()
        cached, uncached = _read_cache(path), _uncached.get(path, {})
        known = {**cached, **uncached}
        wanted = [shape.key(dtype) for dtype in dtypes for shape in shapes]
        missing = [(shape, count, dtype) for dtype in dtypes for shape, count in shapes.items()
                   if shape.key(dtype) not in known]
        if not missing:
            if all(key in cached for key in wanted):
                return known, f"cached in {path}"
            return known, "measured earlier in this process, not cached"
        fresh: dict[str, dict] = {}

        def measure() -> None:
            for dtype in dtypes:
                wanted_shapes = {shape: count for shape, count, missing_dtype in missing if missing_dtype == dtype}
                if not wanted_shapes:
                    continue
                for shape, timings in time_candidates(wanted_shapes, dtype).items():
                    layout, one_row, more_rows = decide(shape, timings)
                    fresh[shape.key(dtype)] = {"count": wanted_shapes[shape], "layout": layout, "one_row": one_row,
                                               "more_rows": more_rows, "seconds": timings}

        start = time.perf_counter()
        busy = foreign_share(measure)
        note = f"measured in {time.perf_counter() - start:.1f} s"
        known.update(fresh)
        if busy > BUSY_LIMIT:
            _uncached.setdefault(path, {}).update(fresh)
            return known, f"{note}; not cached: other work used {100 * busy:.0f}% of the CPUs meanwhile"
        try:
            stored = {**_read_cache(path), **fresh}
            atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "machine": machine(), "shapes": stored},
                                               indent=1, sort_keys=True) + "\n")
        except OSError as error:
            _uncached.setdefault(path, {}).update(fresh)
            return known, f"{note}; not cached: {error.strerror or error}"
        return known, f"{note}, cached in {path}"


# --- what the model and the command line use ------------------------------------------------------

def choose_kernels(shapes: Mapping[LinearShape, int], dtype: torch.dtype, *, force: str | None = None,
                   announce: bool = True) -> dict[LinearShape, tuple[str, str, str]]:
    """(layout, one-row kernel, kernel for more rows) of every shape, measured or from the cache.

    `force` ("KERNEL" or "ONE/MORE", for tests and benchmarks) gives every shape that choice, with no
    measurement. `announce` prints one line on stderr saying what was chosen.
    """
    if force is not None:
        chosen = {shape: forced_choice(force, shape.tied) for shape in shapes}
        note = "forced"
    else:
        known, note = ensure_measured(shapes, [dtype])
        chosen = {}
        for shape in shapes:
            entry = known[shape.key(dtype)]
            chosen[shape] = (entry["layout"], entry["one_row"], entry["more_rows"])
    if announce:
        groups: dict[str, list[str]] = {}
        for shape, (_, one_row, more_rows) in chosen.items():
            groups.setdefault(f"{one_row} / {more_rows}", []).append(shape.label())
        summary = "; ".join(f"{kernels} for {', '.join(labels)}" for kernels, labels in groups.items())
        print(f"decoding kernels for this machine ({note}): {dtype_name(dtype)} one row / more rows: {summary}",
              file=sys.stderr)
    return chosen


def decoding_dtype(config: GPT2Config | None = None, *, announce: bool = True) -> torch.dtype:
    """bf16 if a decode step's products (batch 1, each shape's chosen kernel) take less time than in fp32.

    `config` gives the shapes (GPT-2 Small's when None). Measured once per machine and cached with
    the kernel decisions. Attention over the cache and the elementwise work are left out: at these
    shapes they are a small part of a step.
    """
    shapes = config_shapes(config if config is not None else GPT2Config())
    known, note = ensure_measured(shapes, [torch.float32, torch.bfloat16])
    step = {}
    for dtype in (torch.float32, torch.bfloat16):
        entries = {shape: known[shape.key(dtype)] for shape in shapes}
        step[dtype] = sum(count * entries[shape]["seconds"]["1"][entries[shape]["one_row"]]
                          for shape, count in shapes.items())
    chosen = torch.bfloat16 if step[torch.bfloat16] < step[torch.float32] else torch.float32
    if announce:
        print(f"decoding dtype for this machine ({note}): {dtype_name(chosen)}; a step's products take "
              f"{1e3 * step[torch.bfloat16]:.1f} ms in bf16, {1e3 * step[torch.float32]:.1f} ms in fp32",
              file=sys.stderr)
    return chosen


def optimize_for_decoding(model: GPT2, kernel: str | None = None) -> GPT2:
    """Hold a built model's Linears in the layouts this machine decodes fastest with; returns the model.

    The logits stay those of the plain model within the dtype's rounding (only the order of the
    sums changes). `kernel` forces one choice everywhere (see `choose_kernels`). The model is marked
    `optimized_for_decoding` and put in eval mode: it can only decode, and `gpt2kids.hf.export`
    refuses it. On a GPU the weights are only made row-major, what its kernels read fastest.
    """
    if getattr(model, "optimized_for_decoding", False):
        return model
    model.eval()  # decoding only: no dropout
    embedding = model.transformer.wte
    targets = decoding_linears(model)
    if embedding.weight.device.type != "cpu":
        for parent, name in targets:
            linear = getattr(parent, name)
            if not linear.weight.is_contiguous():
                linear.weight.data = linear.weight.data.contiguous()
        model.optimized_for_decoding = True
        return model
    shapes = [linear_shape(model, getattr(parent, name)) for parent, name in targets]
    counts: dict[LinearShape, int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    chosen = choose_kernels(counts, embedding.weight.dtype, force=kernel)
    for (parent, name), shape in zip(targets, shapes, strict=True):
        module = DecodingLinear.from_linear(getattr(parent, name), *chosen[shape],
                                            embedding=embedding if shape.tied else None)
        setattr(parent, name, module)
    model.optimized_for_decoding = True
    return model


__all__ = [
    "FEW_ROWS", "DecodingLinear", "LinearShape", "cache_file", "choose_kernels", "config_shapes", "decide",
    "decoding_dtype", "decoding_linears", "ensure_measured", "forced_choice", "lay_out", "layouts", "machine",
    "model_shapes", "optimize_for_decoding", "storage_shape", "time_candidates",
]

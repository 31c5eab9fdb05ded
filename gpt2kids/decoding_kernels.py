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
  process-wide switch that is not safe to flip while other threads compute.

A Linear holds its weight in one layout (`layouts`), which serves every number of rows: a one-row
input takes the layout's kernel chosen for one row, more rows the one chosen for `FEW_ROWS` rows.
The layout kept is the one whose two chosen kernels take least time together. The tied LM head
keeps one copy of its weight, which the token embedding reads too. Timings run on synthetic weights
of the model's shapes, as many of each as the model holds, so that calls read weights from memory
as a decode step does; candidates alternate, and each figure is a median. A measurement during
which other work used much of the CPUs is used but not cached.

`optimize_for_decoding` applies the decisions to a built model; `decoding_dtype` compares a decode
step's products in fp32 and bf16 for `--precision auto`. Afterwards the model can only decode: most
layouts hold the weights as buffers of their own, and `gpt2kids.hf.export` refuses the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from gpt2kids.model import GPT2

FEW_ROWS = 8  # batched decoding: the kernels for more than one row are timed at this many rows
BUSY_LIMIT = 0.25  # share of the machine's CPUs used by other work above which a measurement is not cached
ROUNDS = 3  # timed calls per candidate; the median is kept
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CACHE_VERSION = 1


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
    bias], out/P), the output columns in P blocks. A tied weight has one copy for the head and the
    embedding: `cols-P`, (in, out) padded to P blocks, whose blocks are strided views.
    """
    parts = parts or torch.get_num_threads()
    split, bag = f"split-{parts}", f"bag-{parts}"
    if tied:
        return {"rows": (["linear", "mv"], ["linear"]), f"cols-{parts}": (["cols", split, bag], ["cols", split])}
    return {"rows": (["linear", "mv"], ["linear"]), "cols": (["cols"], ["cols"]),
            f"blocks-{parts}": ([split, bag], [split])}


def kernel_parts(kernel: str) -> int:
    count = kernel.partition("-")[2]
    return int(count) if count else torch.get_num_threads()


def layout_for(kernel: str, tied: bool) -> str:
    """The layout in which `kernel` computes one row (split and bag: one block per thread unless given)."""
    name, _, count = kernel.partition("-")
    if name not in ("linear", "mv", "cols", "split", "bag") or (count and name not in ("split", "bag")):
        raise ValueError(f"unknown decoding kernel {kernel!r}")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"decoding kernel {kernel!r} needs a whole number of blocks")
    parts = kernel_parts(kernel)
    if name in ("linear", "mv"):
        return "rows"
    if tied:
        return f"cols-{parts}"
    return "cols" if name == "cols" else f"blocks-{parts}"


def forced_choice(force: str, tied: bool) -> tuple[str, str, str]:
    """(layout, one-row kernel, kernel for more rows) for `force`, "ONE" or "ONE/MORE".

    The layout is the one where ONE runs; MORE is used where that layout runs it, else the layout's
    first kernel for more rows (so "bag/cols" gives the tied head `cols` and other Linears `split`).
    """
    one, _, more = force.partition("/")
    layout = layout_for(one, tied)
    if more:
        layout_for(more, tied)  # a known name
    parts = int(layout.partition("-")[2] or torch.get_num_threads())
    one_kernels, more_kernels = layouts(tied, parts)[layout]
    one = next(kernel for kernel in one_kernels if kernel.partition("-")[0] == one.partition("-")[0])
    matches = [kernel for kernel in more_kernels if kernel.partition("-")[0] == more.partition("-")[0]]
    return layout, one, matches[0] if matches else more_kernels[0]


def storage_shape(layout: str, shape: LinearShape) -> tuple[int, ...]:
    """The shape of the one tensor that holds a weight (and in `blocks-P`, its bias) in `layout`."""
    out_features, in_features = shape.out_features, shape.in_features
    name, _, count = layout.partition("-")
    if name == "rows":
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

def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (Linux sysfs), 32 MiB where unknown: sizes the flush between rounds."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) or 32 << 20


_flush_buffer: torch.Tensor | None = None


def flush_caches() -> None:
    """Read twice the last-level cache's worth of other memory, so the next calls find their weights cold."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.ones(min(2 * last_level_cache_bytes(), 1 << 30) // 4)
    _flush_buffer.sum()


@torch.inference_mode()
def time_candidates(shape: LinearShape, count: int, dtype: torch.dtype,
                    cold: bool = True) -> dict[str, dict[str, float]]:
    """Median seconds per call of every kernel: {"1": {one-row kernel: s}, "8": {kernel for more rows: s}}.

    Each layout gets `count` synthetic weights (as many as the model holds). With `cold` (a model
    larger than the cache) the caches are flushed before every round, so each call reads its weight
    from memory, as in a decode step, where the rest of the model passes between two uses of a
    weight. The values are constant: none of these kernels depends on them. An untimed first round
    takes the kernels' set-up (oneDNN primitives, thread pools). A kernel that fails is left out.
    """
    one = torch.randn(1, shape.in_features).to(dtype)
    few = torch.randn(FEW_ROWS, shape.in_features).to(dtype)
    bias = torch.full((shape.out_features,), 0.01, dtype=dtype) if shape.bias else None
    tasks: list[tuple[str, str, list[DecodingLinear], torch.Tensor]] = []  # (rows class, kernel, weights, input)
    for layout, (one_kernels, more_kernels) in layouts(shape.tied).items():
        storage = torch.full((count, *storage_shape(layout, shape)), 0.01, dtype=dtype)
        modules = [DecodingLinear(storage[i], bias, shape, layout, one_kernels[0], more_kernels[0])
                   for i in range(count)]
        tasks += [("1", kernel, modules, one) for kernel in one_kernels]
        tasks += [(str(FEW_ROWS), kernel, modules, few) for kernel in more_kernels]
    samples: dict[tuple[str, str], list[float]] = {(rows, kernel): [] for rows, kernel, _, _ in tasks}
    for round_index in range(ROUNDS + 1):  # candidates alternate, so a change of load hits all alike
        if cold:
            flush_caches()
        for task_index, (rows, kernel, modules, x) in enumerate(tasks):
            if (rows, kernel) not in samples:
                continue
            # Within a round, every call of a layout reads another of its weights (when it has enough).
            module = modules[(round_index * len(tasks) + task_index) % count]
            start = time.perf_counter()
            try:
                module.compute(x, kernel)
            except RuntimeError:
                del samples[rows, kernel]
                continue
            if round_index > 0:
                samples[rows, kernel].append(time.perf_counter() - start)
    timings: dict[str, dict[str, float]] = {"1": {}, str(FEW_ROWS): {}}
    for (rows, kernel), values in samples.items():
        timings[rows][kernel] = statistics.median(values)
    return timings


def decide(shape: LinearShape, timings: Mapping[str, Mapping[str, float]]) -> tuple[str, str, str]:
    """(layout, one-row kernel, kernel for more rows): the layout whose two fastest kernels take least together."""
    one, few = timings["1"], timings[str(FEW_ROWS)]
    parts = None
    for kernel in [*one, *few]:
        if kernel.partition("-")[2]:
            parts = kernel_parts(kernel)
    best: tuple[float, str, str, str] | None = None
    for layout, (one_kernels, more_kernels) in layouts(shape.tied, parts).items():
        one_timed = [kernel for kernel in one_kernels if kernel in one]
        more_timed = [kernel for kernel in more_kernels if kernel in few]
        if not one_timed or not more_timed:
            continue
        one_best, more_best = min(one_timed, key=one.__getitem__), min(more_timed, key=few.__getitem__)
        score = one[one_best] + few[more_best]
        if best is None or score < best[0]:
            best = (score, layout, one_best, more_best)
    if best is None:
        return "rows", "linear", "linear"  # nothing could be timed: what the plain model runs
    return best[1:]


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
        known = {**_read_cache(path), **_uncached.get(path, {})}
        missing = [(shape, count, dtype) for dtype in dtypes for shape, count in shapes.items()
                   if shape.key(dtype) not in known]
        if not missing:
            return known, f"cached in {path}"
        fresh: dict[str, dict] = {}

        cache_bytes = last_level_cache_bytes()
        model_bytes = {dtype: sum(count * shape.out_features * shape.in_features * dtype.itemsize
                                  for shape, count in shapes.items()) for dtype in dtypes}

        def measure() -> None:
            for shape, count, dtype in missing:
                timings = time_candidates(shape, count, dtype, cold=model_bytes[dtype] > cache_bytes)
                layout, one_row, more_rows = decide(shape, timings)
                fresh[shape.key(dtype)] = {"count": count, "layout": layout, "one_row": one_row,
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

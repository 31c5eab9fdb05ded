"""Decoding kernels chosen by measurement on the machine that runs them.

A decode step feeds one token per sequence, so every Linear multiplies one row (batch 1) or a few
(batched decoding) by its weight: it reads the whole weight for two FLOPs per value, and the step is
bound by how fast the kernel streams weights. Which PyTorch call streams fastest depends on the CPU,
on the oneDNN and BLAS builds inside torch and on the thread count, and it differs between the CPUs
this project runs on. So nothing here follows a CPU's name or flags: every candidate is timed on
synthetic weights of the model's shapes, the fastest is kept, and the decision is cached per machine
(`cache_file`). The candidates all compute `x @ W.T + b` with fp32 accumulation, in another order:

- `linear`: `F.linear` on the (out, in) weight, what the plain model runs;
- `mv`: `torch.addmv` on the same weight (one row);
- `packed`: oneDNN's Linear on a weight reordered once into its own blocked format (what
  torch.compile's CPU backend calls);
- `split-P`: the output columns in P = `torch.get_num_threads()` blocks, one `baddbmm`, so that
  each thread streams one block;
- `bag-P`: the same blocks through `F.embedding_bag` with per-sample weights (one row): x @ W.T is
  the x-weighted sum of the rows of W.T, one bag per block. Native PyTorch, without oneDNN and so
  without `torch.backends.mkldnn.enabled`, a process-wide switch not safe to flip while other
  threads decode;
- `cols`: a matmul against a column-major copy, for the tied LM head only (elsewhere it never wins).

A weight is held where its one-row kernel reads it (`KERNELS`); inputs of more rows take a kernel
that reads the same copy. The tied LM head keeps one copy, which the token embedding reads too: as
it is, or column-major in P blocks (a strided view for the embedding). Afterwards the model can only
decode, and `gpt2kids.hf.export` refuses it.
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
from collections import Counter
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
ONE_ROW_SLACK = 0.1  # a choice this much slower for one row than the fastest may still win on more rows
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CACHE_VERSION = 3

KERNELS = {"linear": "rows", "mv": "rows", "packed": "packed", "split": "blocks", "bag": "blocks", "cols": "blocks"}
ONE_ROW_ONLY = ("mv", "bag")
MORE_ROWS = {"rows": "linear", "packed": "packed", "blocks": "split"}  # the default for more rows in each copy


@dataclass(frozen=True)
class LinearShape:
    out_features: int
    in_features: int
    bias: bool
    tied: bool  # the weight is shared with the token embedding (GPT-2's LM head)

    def key(self, dtype: torch.dtype) -> str:
        return (f"{DTYPE_NAMES.get(dtype, dtype)} {self.out_features}x{self.in_features}"
                f"{' bias' if self.bias else ''}{' tied' if self.tied else ''}")

    def label(self) -> str:
        return f"{self.out_features}x{self.in_features}{' (tied head)' if self.tied else ''}"


def runs_on(name: str, tied: bool) -> bool:
    # The embedding cannot read a packed copy; a column-major copy only pays off for the tied head.
    return name != ("packed" if tied else "cols")


def parse(kernel: str) -> tuple[str, int]:
    """(name, blocks) of a kernel name such as "linear" or "split-3" (blocks: one per thread unless given)."""
    name, _, count = kernel.partition("-")
    if name not in KERNELS or (count and (name not in ("split", "bag") or not count.isdigit() or int(count) < 1)):
        raise ValueError(f"unknown decoding kernel {kernel!r}: use linear, mv, packed, cols, split[-P] or bag[-P]")
    return name, int(count) if count else torch.get_num_threads()


def with_blocks(name: str, parts: int) -> str:
    return f"{name}-{parts}" if name in ("split", "bag") else name


def resolve(kernel: str, tied: bool) -> tuple[str, str]:
    """(one-row kernel, kernel for more rows) of "ONE" or "ONE/MORE" on a weight, tied or not.

    MORE is used if it reads the copy ONE reads, else that copy's default (`MORE_ROWS`). A tied
    weight forced to `packed` gets `linear`, an untied one forced to `cols` gets `split`.
    """
    one, _, more = kernel.partition("/")
    name, parts = parse(one)
    more_name = parse(more)[0] if more else ""
    if not runs_on(name, tied):
        name = "linear" if tied else "split"
    if KERNELS.get(more_name) != KERNELS[name] or more_name in ONE_ROW_ONLY or not runs_on(more_name, tied):
        more_name = MORE_ROWS[KERNELS[name]]
    return with_blocks(name, parts), with_blocks(more_name, parts)


class DecodingLinear(nn.Module):
    """An `nn.Linear` for decoding: one-row inputs by kernel `one_row`, more rows by `more_rows`.

    `kernel` is "ONE" or "ONE/MORE" (see `resolve`); `embedding`: the token embedding that shares the
    weight, if any. `linear` and `mv` keep the Linear's own parameters, so a tied weight stays tied.
    """

    def __init__(self, linear: nn.Linear, kernel: str, embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.one_row, self.more_rows = resolve(kernel, tied=embedding is not None)
        name, self.parts = parse(self.one_row)
        weight, bias = linear.weight, linear.bias
        if KERNELS[name] == "rows":
            weight.data = weight.data.contiguous()  # HF's Conv1D weights arrive transposed
            self.weight, self.bias = weight, bias
        elif KERNELS[name] == "packed":
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                                                   FEW_ROWS))
            self.bias = bias
        elif embedding is not None and bias is not None:
            raise ValueError("a tied weight with a bias has no column-major copy; use linear or mv")
        else:
            self.hold_blocks(weight.detach(), None if bias is None else bias.detach(), embedding)

    def hold_blocks(self, weight: torch.Tensor, bias: torch.Tensor | None, embedding: nn.Embedding | None) -> None:
        """The output columns in P blocks (the last padded with zeros), as `split` and `bag` read them."""
        parts, in_features = self.parts, self.in_features
        width = -(-self.out_features // parts)
        padded = F.pad(weight, (0, 0, 0, parts * width - self.out_features))  # (P * width, in)
        if embedding is None:
            if bias is not None:  # the bias as one more input row: `bag` adds it in its fp32 sum
                padded = torch.cat([padded, F.pad(bias, (0, parts * width - self.out_features))[:, None]], dim=1)
            blocks = padded.view(parts, width, -1).transpose(1, 2).contiguous()  # block p streams on its own
            table = blocks
        else:
            # One (in, P * width) copy: `cols` reads it whole, the blocks and the embedding are strided views.
            self.register_buffer("cols", padded.t().contiguous())
            embedding.weight.data = self.cols[:, :self.out_features].t()
            blocks = self.cols.view(in_features, parts, width).transpose(0, 1)
            table = self.cols
        rows = blocks.shape[1]
        self.register_buffer("blocks", blocks[:, :in_features])
        self.register_buffer("bias_blocks", blocks[:, in_features:] if rows > in_features else None)
        # Bag p sums the table rows that make block p, each weighted by its input (the bias row by one).
        self.register_buffer("table", table.reshape(-1, width))
        block, row = torch.arange(parts)[:, None], torch.arange(rows)[None, :]
        self.register_buffer("indices", ((block * blocks.stride(0) + row * blocks.stride(1)) // width).reshape(-1))
        self.register_buffer("offsets", torch.arange(0, parts * rows, rows))
        self.register_buffer("one", weight.new_ones(1) if rows > in_features else None)

    def compute(self, rows: torch.Tensor, kernel: str) -> torch.Tensor:
        """(R, in) -> (R, out) by `kernel`, one that reads this module's copy (a one-row kernel: R == 1)."""
        name = kernel.partition("-")[0]
        if name == "linear":
            return F.linear(rows, self.weight, self.bias)
        if name == "mv":
            if self.bias is None:
                return torch.mv(self.weight, rows[0])[None]
            return torch.addmv(self.bias, self.weight, rows[0])[None]
        if name == "packed":
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        if name == "cols":
            return (rows @ self.cols)[:, :self.out_features]
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
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.one_row}/{self.more_rows}"


# --- the model's shapes and the timing ------------------------------------------------------------

def decoding_linears(model: GPT2) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear a decode step runs, in the order it runs them."""
    return [(parent, name) for block in model.transformer.h
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj"))] + [(model, "lm_head")]


def linear_shape(model: GPT2, linear: nn.Linear) -> LinearShape:
    tied = linear.weight is model.transformer.wte.weight
    return LinearShape(linear.out_features, linear.in_features, linear.bias is not None, tied)


def config_shapes(config: GPT2Config) -> dict[LinearShape, int]:
    """How many Linears of each shape a decode step of `config`'s model runs."""
    with torch.device("meta"):
        model = GPT2(config)
    return Counter(linear_shape(model, getattr(parent, name)) for parent, name in decoding_linears(model))


def synthetic_linear(shape: LinearShape, dtype: torch.dtype, kernel: str) -> DecodingLinear:
    """A Linear of `shape` held for `kernel`, its weight a broadcast constant: no kernel's speed depends on it."""
    linear = nn.Linear(shape.in_features, shape.out_features, shape.bias, device="meta")
    weight = torch.full((), 0.01, dtype=dtype).expand(shape.out_features, shape.in_features)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = nn.Parameter(torch.full((shape.out_features,), 0.01, dtype=dtype), requires_grad=False) \
        if shape.bias else None
    embedding = nn.Embedding(*weight.shape, _weight=weight, _freeze=True) if shape.tied else None
    return DecodingLinear(linear, kernel, embedding)


@torch.inference_mode()
def time_candidates(shapes: Mapping[LinearShape, int], dtype: torch.dtype) -> dict[LinearShape, dict[str, dict]]:
    """Median seconds per call of every kernel, per shape: {"1": {kernel: s}, "8": {kernel: s}}.

    One copy kind (`KERNELS`) at a time, every shape gets as many weights as the model holds, and
    each timed round is a pass over them in the model's order: the traffic of a decode step, whose
    weights come from memory, or from the cache when the model fits in it. Untimed first calls take
    the kernels' set-up (oneDNN primitives, thread pools); a kernel that fails there is left out.
    """
    threads = torch.get_num_threads()
    inputs = {(shape.in_features, rows): torch.randn(rows, shape.in_features).to(dtype)
              for shape in shapes for rows in (1, FEW_ROWS)}
    # A pass calls a shape held n times at 1/n, 2/n, ... 1 of the way through.
    calls = sorted(((shape, copy) for shape, count in shapes.items() for copy in range(count)),
                   key=lambda call: (call[1] + 1) / shapes[call[0]])
    samples: dict[tuple[LinearShape, int, str], list[float]] = {}
    for copy_kind in MORE_ROWS:
        modules, timed = {}, []
        for shape, count in shapes.items():
            names = [name for name, kind in KERNELS.items() if kind == copy_kind and runs_on(name, shape.tied)]
            if not names:
                continue
            try:
                modules[shape] = [synthetic_linear(shape, dtype, with_blocks(names[0], threads)) for _ in range(count)]
            except (RuntimeError, AttributeError):  # e.g. a torch built without oneDNN has no packed weights
                continue
            for rows in (1, FEW_ROWS):
                for name in names:
                    if rows > 1 and name in ONE_ROW_ONLY:
                        continue
                    with contextlib.suppress(RuntimeError):
                        modules[shape][0].compute(inputs[shape.in_features, rows], with_blocks(name, threads))
                        timed.append((shape, rows, with_blocks(name, threads)))
        tasks = list(dict.fromkeys((rows, kernel) for _, rows, kernel in timed))
        for round_index in range(ROUNDS):
            for rows, kernel in tasks if round_index % 2 == 0 else tasks[::-1]:  # alternate the order
                for shape, copy in calls:
                    # Each round times every other copy of a shape held more than once (the others in
                    # the next round): half the calls, and still the model's traffic in between.
                    if (shape, rows, kernel) not in timed or (shapes[shape] > 1 and (copy + round_index) % 2):
                        continue
                    x, module = inputs[shape.in_features, rows], modules[shape][copy]
                    start = time.perf_counter()
                    module.compute(x, kernel)
                    samples.setdefault((shape, rows, kernel), []).append(time.perf_counter() - start)
            if round_index == 0:  # drop the hopeless: their first figures stand
                first = {key: statistics.median(samples[key]) for key in timed}
                best: dict[tuple[LinearShape, int], float] = {}
                for (shape, rows, _), seconds in first.items():
                    best[shape, rows] = min(seconds, best.get((shape, rows), seconds))
                timed = [key for key in timed if first[key] <= PRUNE * best[key[:2]]]
        del modules
    timings: dict[LinearShape, dict[str, dict]] = {shape: {"1": {}, str(FEW_ROWS): {}} for shape in shapes}
    for (shape, rows, kernel), values in samples.items():
        timings[shape][str(rows)][kernel] = statistics.median(values)
    return timings


def decide(timings: Mapping[str, Mapping[str, float]]) -> tuple[str, str]:
    """(one-row kernel, kernel for more rows) that read the same copy of the weight.

    One row (batch-1 decoding, the common case) comes first: the pair with the fastest one-row
    kernel, unless another within `ONE_ROW_SLACK` of it runs `FEW_ROWS` rows faster.
    """
    one, few = timings["1"], timings[str(FEW_ROWS)]
    pairs = [(a, b) for a in one for b in few if KERNELS[parse(a)[0]] == KERNELS[parse(b)[0]]]
    if not pairs:
        return "linear", "linear"  # nothing could be timed: what the plain model runs
    fastest = min(one[a] for a, _ in pairs)
    close = [(a, b) for a, b in pairs if one[a] <= (1 + ONE_ROW_SLACK) * fastest]
    return min(close, key=lambda pair: (few[pair[1]], one[pair[0]]))


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


def read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: measured again and rewritten
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("machine") != machine():
        return {}
    shapes = data.get("shapes")
    return shapes if isinstance(shapes, dict) else {}


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, and steal), or None off Linux."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def foreign_share(run: Callable[[], object]) -> float:
    """Run `run`; the share of the machine's CPUs that other work used meanwhile (0 where unknown)."""
    busy, own, start = busy_seconds(), time.process_time(), time.perf_counter()
    run()
    after, own_after, wall = busy_seconds(), time.process_time(), time.perf_counter() - start
    if busy is None or after is None or wall <= 0:
        return 0.0
    return max(0.0, after - busy - (own_after - own)) / (wall * (os.cpu_count() or 1))


_lock = threading.Lock()
_uncached: dict[Path, dict[str, dict]] = {}  # decisions this process measured but could not cache


def ensure_measured(shapes: Mapping[LinearShape, int], dtypes: list[torch.dtype]) -> tuple[dict[str, dict], str]:
    """Every (shape, dtype)'s entry, from the cache or measured now, and a note on where they came from."""
    with _lock:
        path = cache_file()
        cached = read_cache(path)
        known = {**cached, **_uncached.get(path, {})}
        missing = {dtype: {shape: count for shape, count in shapes.items() if shape.key(dtype) not in known}
                   for dtype in dtypes}
        if not any(missing.values()):
            if all(shape.key(dtype) in cached for dtype in dtypes for shape in shapes):
                return known, f"cached in {path}"
            return known, "measured earlier in this process, not cached"
        fresh: dict[str, dict] = {}

        def measure() -> None:
            for dtype, wanted in missing.items():
                for shape, timings in time_candidates(wanted, dtype).items() if wanted else ():
                    one_row, more_rows = decide(timings)
                    fresh[shape.key(dtype)] = {"one_row": one_row, "more_rows": more_rows, "seconds": timings}

        start = time.perf_counter()
        busy = foreign_share(measure)
        note = f"measured in {time.perf_counter() - start:.1f} s"
        known.update(fresh)
        if busy > BUSY_LIMIT:
            _uncached.setdefault(path, {}).update(fresh)
            return known, f"{note}; not cached: other work used {100 * busy:.0f}% of the CPUs meanwhile"
        try:
            stored = {**read_cache(path), **fresh}
            atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "machine": machine(), "shapes": stored},
                                               indent=1, sort_keys=True) + "\n")
        except OSError as error:
            _uncached.setdefault(path, {}).update(fresh)
            return known, f"{note}; not cached: {error.strerror or error}"
        return known, f"{note}, cached in {path}"


# --- what the model and the command line use ------------------------------------------------------

def choose_kernels(shapes: Mapping[LinearShape, int], dtype: torch.dtype, *, force: str | None = None,
                   announce: bool = True) -> dict[LinearShape, tuple[str, str]]:
    """(one-row kernel, kernel for more rows) of every shape, measured or from the cache.

    `force` ("KERNEL" or "ONE/MORE", for tests and benchmarks) gives every shape that choice, with no
    measurement. `announce` prints one line on stderr saying what was chosen.
    """
    if force is not None:
        chosen = {shape: resolve(force, shape.tied) for shape in shapes}
        note = "forced"
    else:
        known, note = ensure_measured(shapes, [dtype])
        chosen = {shape: (known[shape.key(dtype)]["one_row"], known[shape.key(dtype)]["more_rows"])
                  for shape in shapes}
    if announce:
        groups: dict[str, list[str]] = {}
        for shape, (one_row, more_rows) in chosen.items():
            groups.setdefault(f"{one_row} / {more_rows}", []).append(shape.label())
        summary = "; ".join(f"{kernels} for {', '.join(labels)}" for kernels, labels in groups.items())
        print(f"decoding kernels for this machine ({note}): {DTYPE_NAMES[dtype]} one row / more rows: {summary}",
              file=sys.stderr)
    return chosen


def decoding_dtype(config: GPT2Config | None = None, *, announce: bool = True) -> torch.dtype:
    """bf16 if a decode step's products (batch 1, each shape's chosen kernel) take less time than in fp32.

    `config` gives the shapes (GPT-2 Small's when None). Attention over the cache and the elementwise
    work are left out: at these shapes they are a small part of a step.
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
        print(f"decoding dtype for this machine ({note}): {DTYPE_NAMES[chosen]}; a step's products take "
              f"{1e3 * step[torch.bfloat16]:.1f} ms in bf16, {1e3 * step[torch.float32]:.1f} ms in fp32",
              file=sys.stderr)
    return chosen


def optimize_for_decoding(model: GPT2, kernel: str | None = None) -> GPT2:
    """Hold a built model's Linears as this machine decodes fastest; returns the model, in eval mode.

    The logits stay those of the plain model within the dtype's rounding (only the order of the sums
    changes). `kernel` forces one choice everywhere (see `choose_kernels`). On a GPU the weights are
    only made row-major, what its kernels read fastest.
    """
    if getattr(model, "optimized_for_decoding", False):
        return model
    model.eval()  # decoding only: no dropout
    embedding = model.transformer.wte
    targets = decoding_linears(model)
    if embedding.weight.device.type == "cpu":
        shapes = [linear_shape(model, getattr(parent, name)) for parent, name in targets]
        chosen = choose_kernels(Counter(shapes), embedding.weight.dtype, force=kernel)
        for (parent, name), shape in zip(targets, shapes, strict=True):
            one_row, more_rows = chosen[shape]
            module = DecodingLinear(getattr(parent, name), f"{one_row}/{more_rows}", embedding if shape.tied else None)
            setattr(parent, name, module)
    else:
        for parent, name in targets:
            weight = getattr(parent, name).weight
            weight.data = weight.data.contiguous()
    model.optimized_for_decoding = True  # gpt2kids.hf.export refuses it
    return model

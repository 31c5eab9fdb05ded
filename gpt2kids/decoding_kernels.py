"""Decoding kernels chosen by measurement on the machine that runs them.

A decode step multiplies one row per sequence (or a few) by each weight: two FLOPs per value read, so
it is bound by how fast a kernel streams weights, which depends on the CPU, torch's oneDNN and BLAS
builds and the thread count. So the candidates, all `x @ W.T + b` with fp32 sums, are timed on weights
of the model's shapes and the decisions cached per machine, never chosen by a CPU's name or flags:
- `linear` (`F.linear`, as the plain model) and `mv` (`torch.addmv`, one row) on the (out, in) weight;
- `packed`: oneDNN's Linear on a weight reordered into its blocked format (what torch.compile calls); for
  the tied LM head a copy beside the embedding's weight;
- `split`: the output columns in one block per thread, one `baddbmm`; `bag` (one row): the same blocks
  through `F.embedding_bag` with per-sample weights x (x @ W.T is the x-weighted sum of W.T's rows);
- `cols`: a matmul against a column-major copy of the tied LM head, which the embedding reads too.
The KV cache's dtype is chosen the same way: one-query attention over bf16 keys can be slower than
casting the query up and attending over fp32 keys (`AttentionShape`, `WideCacheAttention`).
None needs `torch.backends.mkldnn.enabled` flipped, a process-wide switch unsafe while threads decode.
"""

import contextlib
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kids.atomic_files import atomic_write_text
from gpt2kids.config import GPT2Config
from gpt2kids.data import cache_root, ceil_div
from gpt2kids.device import DTYPES, bf16_is_fast, check_precision
from gpt2kids.errors import UserError
from gpt2kids.hf import empty_model
from gpt2kids.model import GPT2, CausalSelfAttention

FEW_ROWS = 8  # batched decoding: kernels for more than one row are timed at this many rows
ROUNDS = 4  # timed passes per kernel, in alternating order; the median over passes and copies is kept
BUSY_LIMIT = 0.25  # share of the CPUs used by other work above which a measurement is not cached
CACHE_VERSION = 4
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The copy of the weight each kernel reads, and the kernels that run more rows on each copy.
COPY = {"linear": "rows", "mv": "rows", "packed": "packed", "split": "blocks", "bag": "blocks", "cols": "blocks"}
MORE_ROWS = {"rows": ("linear",), "packed": ("packed",), "blocks": ("split", "cols")}
TIED_ONLY = "cols"  # its column-major copy pays off only where the embedding reads it too
CACHED_KEYS = 128  # attention is timed over this many cached keys: a prompt and 100 new tokens


class LinearShape(NamedTuple):
    out_features: int
    in_features: int
    bias: bool
    tied: bool  # the weight is the token embedding's (GPT-2's LM head)

    def label(self) -> str:
        return f"{self.out_features}x{self.in_features}{' (tied head)' if self.tied else ''}"

    def key(self, dtype: torch.dtype) -> str:
        return f"{DTYPE_NAMES[dtype]} {self.label()}{' bias' if self.bias else ''}"


class AttentionShape(NamedTuple):
    """A decode step's attention; its candidates are the KV cache's dtype: the weights' own, or fp32."""

    heads: int
    head_dim: int

    def label(self) -> str:
        return f"the KV cache of attention {self.heads}x{self.head_dim}"

    def key(self, dtype: torch.dtype) -> str:
        return f"{DTYPE_NAMES[dtype]} {self.label()}"


Shape = LinearShape | AttentionShape


def kernel_pair(kernel: str, tied: bool) -> tuple[str, str]:
    """(one-row kernel, kernel for more rows) of "ONE" or "ONE/MORE"; MORE only where it reads ONE's copy."""
    one, _, more = kernel.partition("/")
    if one not in COPY or (more and more not in COPY):
        raise ValueError(f"unknown decoding kernel {kernel!r}: use ONE or ONE/MORE of {', '.join(COPY)}")
    if one == TIED_ONLY and not tied:
        one = "split"
    if more not in MORE_ROWS[COPY[one]] or (more == TIED_ONLY and not tied):
        more = MORE_ROWS[COPY[one]][0]
    return one, more


class DecodingLinear(nn.Module):
    """An `nn.Linear` for decoding: kernel `one_row` for one-row inputs, `more_rows` for more (see `kernel_pair`)."""

    def __init__(self, linear: nn.Linear, kernel: str, embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.one_row, self.more_rows = kernel_pair(kernel, tied=embedding is not None)
        weight, self.bias = linear.weight, linear.bias  # parameters stay parameters: a tied weight stays tied
        if COPY[self.one_row] == "rows":
            weight.data = weight.data.contiguous()  # HF's Conv1D weights arrive transposed
            self.weight = weight
        elif COPY[self.one_row] == "packed":  # a tied weight stays the embedding's too: this is a second copy
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.data.contiguous(), FEW_ROWS))
        else:
            self.hold_blocks(weight.detach(), embedding)

    def hold_blocks(self, weight: torch.Tensor, embedding: nn.Embedding | None) -> None:
        self.parts = torch.get_num_threads()  # one block per thread
        width = ceil_div(self.out_features, self.parts)  # the last block is padded with zeros
        padding = self.parts * width - self.out_features
        padded = F.pad(weight, (0, 0, 0, padding))  # (P * width, in)
        if self.bias is not None:  # the bias as one more input row: `bag` adds it in its fp32 sum, weighted by one
            padded = torch.cat([padded, F.pad(self.bias.detach(), (0, padding))[:, None]], dim=1)
        self.register_buffer("one", torch.ones(1, dtype=weight.dtype))
        if embedding is None:  # block after block, so that each thread streams its own
            blocks = table = padded.view(self.parts, width, -1).transpose(1, 2).contiguous()
        else:  # one column-major copy: `cols` reads it whole; the blocks and the embedding are strided views
            self.register_buffer("cols", padded.t().contiguous())
            embedding.weight.data = self.cols[:, :self.out_features].t()  # (GPT-2's head has no bias)
            blocks = self.cols.view(-1, self.parts, width).transpose(0, 1)
            table = self.cols
        rows = blocks.shape[1]  # in, and one more for a bias
        self.register_buffer("blocks", blocks[:, :self.in_features])
        self.register_buffer("bias_blocks", blocks[:, self.in_features:] if rows > self.in_features else None)
        self.register_buffer("table", table.view(-1, width))
        # Bag p sums the table rows that hold block p, each weighted by its input (the bias row by one).
        block, row = torch.arange(self.parts)[:, None], torch.arange(rows)[None, :]
        self.register_buffer("indices", ((block * blocks.stride(0) + row * blocks.stride(1)) // width).flatten())
        self.register_buffer("offsets", torch.arange(0, self.parts * rows, rows))

    def compute(self, rows: torch.Tensor, kernel: str) -> torch.Tensor:
        """(R, in) -> (R, out) by `kernel`, one that reads this module's copy (R == 1 for `mv` and `bag`)."""
        if kernel == "linear":
            return F.linear(rows, self.weight, self.bias)
        if kernel == "mv":
            if self.bias is None:
                return torch.mv(self.weight, rows[0])[None]
            return torch.addmv(self.bias, self.weight, rows[0])[None]
        if kernel == "packed":
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        if kernel == "cols":
            return (rows @ self.cols)[:, :self.out_features]
        if kernel == "split":
            stacked = rows.expand(self.parts, *rows.shape)  # the same rows for every block: a view
            if self.bias_blocks is None:
                out = torch.bmm(stacked, self.blocks)
            else:
                out = torch.baddbmm(self.bias_blocks, stacked, self.blocks)
            # (P, R, width) -> (R, P * width): a view for one row, a copy for more.
            return out.transpose(0, 1).reshape(rows.shape[0], -1)[:, :self.out_features]
        vector = [rows[0]] if self.bias_blocks is None else [rows[0], self.one]
        out = F.embedding_bag(self.indices, self.table, self.offsets, mode="sum",
                              per_sample_weights=torch.cat(vector * self.parts))  # one op: a decode step calls it often
        return out.view(1, -1)[:, :self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        kernel = self.one_row if rows.shape[0] == 1 else self.more_rows
        return self.compute(rows, kernel).reshape(*x.shape[:-1], self.out_features)


def decoding_linears(model: GPT2) -> dict[tuple[nn.Module, str], LinearShape]:
    """The shape of every Linear a decode step runs, by (parent, attribute name), in the order it runs them."""
    places = [(parent, name) for block in model.transformer.h for parent, name in
              ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj"))]
    linears = {(parent, name): getattr(parent, name) for parent, name in [*places, (model, "lm_head")]}
    tied = model.transformer.wte.weight
    return {place: LinearShape(linear.out_features, linear.in_features, linear.bias is not None, linear.weight is tied)
            for place, linear in linears.items()}


def decoding_shapes(model: GPT2) -> Counter[Shape]:
    """How many times a decode step runs each Linear shape and the attention."""
    attention = AttentionShape(model.config.n_head, model.config.head_dim)
    return Counter([*decoding_linears(model).values(), *[attention] * model.config.n_layer])


def synthetic_linear(shape: LinearShape, dtype: torch.dtype, kernel: str) -> DecodingLinear:
    """A Linear of `shape` held for `kernel`, its weight a broadcast constant: no kernel's speed depends on it."""
    linear = nn.Linear(shape.in_features, shape.out_features, shape.bias, device="meta")
    weight = torch.full((), 0.01, dtype=dtype).expand(shape.out_features, shape.in_features)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if shape.bias:
        linear.bias = nn.Parameter(torch.full((shape.out_features,), 0.01, dtype=dtype), requires_grad=False)
    return DecodingLinear(linear, kernel, nn.Embedding(*weight.shape, _weight=weight) if shape.tied else None)


class WideCacheAttention(CausalSelfAttention):
    """Attention over a KV cache held in a wider dtype than the weights (fp32 for bf16, where a decode step
    attends faster so): the queries are cast to the cache's dtype, the result back."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return super().attention(q.to(k.dtype), k, v, mask).to(q.dtype)


def one_row(kernels: str) -> str:
    """The one-row choice of a "ONE/MORE" decision."""
    return kernels.split("/")[0]


def kv_cache_dtype(kernels: str) -> torch.dtype:
    """The KV cache's dtype for one row as chosen for an `AttentionShape`, whose "ONE/MORE" names dtypes."""
    return DTYPES[one_row(kernels)]


def hold_kv_cache_in(model: GPT2, dtype: torch.dtype) -> None:
    """Have `generate` keep `model`'s KV cache in `dtype` (`model.kv_cache_dtype`), its attention to match."""
    model.kv_cache_dtype = dtype
    if dtype != model.transformer.wte.weight.dtype:
        for block in model.transformer.h:
            block.attn.__class__ = WideCacheAttention  # a subclass that only casts: the module keeps its state


@torch.inference_mode()
def time_attention(shape: AttentionShape, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Median seconds of one-query attention over `CACHED_KEYS` keys held in `dtype` or in fp32, for 1 and 8 rows."""
    timings: dict[str, dict[str, float]] = {}
    for rows in (1, FEW_ROWS):
        q = torch.randn(rows, shape.heads, 1, shape.head_dim).to(dtype)
        caches = {name: torch.randn(rows, shape.heads, CACHED_KEYS, shape.head_dim).to(DTYPES[name])
                  for name in dict.fromkeys([DTYPE_NAMES[dtype], "fp32"])}
        samples: dict[str, list[float]] = {name: [] for name in caches}
        for _ in range(10 * ROUNDS):  # alternating, so that a disturbance hits both
            for name, cache in caches.items():
                start = time.perf_counter()  # one-query attention as `WideCacheAttention` runs it
                F.scaled_dot_product_attention(q.to(cache.dtype), cache, cache).to(q.dtype)
                samples[name].append(time.perf_counter() - start)
        timings[str(rows)] = {name: statistics.median(values[1:]) for name, values in samples.items()}
    return timings


@torch.inference_mode()
def time_candidates(shapes: Mapping[Shape, int], dtype: torch.dtype) -> dict[Shape, dict[str, dict]]:
    """Median seconds per call of every kernel, per shape: {"1": {kernel: s}, "8": {kernel: s}}."""
    attention = {shape: time_attention(shape, dtype) for shape in shapes if isinstance(shape, AttentionShape)}
    shapes = {shape: count for shape, count in shapes.items() if isinstance(shape, LinearShape)}
    inputs = {(shape.in_features, rows): torch.randn(rows, shape.in_features).to(dtype)
              for shape in shapes for rows in (1, FEW_ROWS)}
    # A pass calls as many weights as the model holds, in its order (a shape held n times at 1/n, 2/n,
    # ... of the way): the traffic of a decode step, whose weights come from memory (or cache).
    calls = sorted(((shape, copy) for shape, count in shapes.items() for copy in range(count)),
                   key=lambda call: (call[1] + 1) / shapes[call[0]])
    samples: dict[tuple[LinearShape, int, str], list[float]] = {}
    # One copy of the weights at a time (memory), each held again in every round, the copies' order
    # reversed each time: kernels of different copies are compared over the same stretch of time.
    for round_index in range(ROUNDS):
        order = 1 if round_index % 2 == 0 else -1
        for kind, more in list(MORE_ROWS.items())[::order]:
            modules, runs = {}, {}  # runs: the shapes each (rows, kernel) runs on
            for shape, count in shapes.items():
                kernels = [kernel for kernel in COPY if COPY[kernel] == kind and (kernel != TIED_ONLY or shape.tied)]
                try:
                    modules[shape] = [synthetic_linear(shape, dtype, kernels[0]) for _ in range(count)]
                except (IndexError, RuntimeError):  # no kernel of this kind, or e.g. a torch without oneDNN
                    continue
                tasks = [(1, kernel) for kernel in kernels]
                tasks += [(FEW_ROWS, kernel) for kernel in kernels if kernel in more]
                for rows, kernel in tasks:
                    with contextlib.suppress(RuntimeError):  # untimed: the kernel's set-up; one that fails is left out
                        modules[shape][0].compute(inputs[shape.in_features, rows], kernel)
                        runs.setdefault((rows, kernel), []).append(shape)
            for (rows, kernel), runnable in list(runs.items())[::order]:
                for shape, copy in calls:
                    # Each round times every other copy of a shape held more than once (the others in
                    # the next round): half the calls, and still the model's traffic in between.
                    if shape not in runnable or (shapes[shape] > 1 and (copy + round_index) % 2):
                        continue
                    x, module = inputs[shape.in_features, rows], modules[shape][copy]
                    start = time.perf_counter()
                    module.compute(x, kernel)
                    samples.setdefault((shape, rows, kernel), []).append(time.perf_counter() - start)
    timings = {shape: {"1": {}, str(FEW_ROWS): {}} for shape in shapes}
    for (shape, rows, kernel), values in samples.items():
        timings[shape][str(rows)][kernel] = statistics.median(values)
    return {**timings, **attention}


def decide(timings: Mapping[str, Mapping[str, float]]) -> str:
    """The "ONE/MORE" pair (kernels reading one copy) least slower than the fastest, for one row or for more.

    One row (interactive) and a few (a prompts file, several sequences) both matter, and kernels
    within noise of each other for one row can differ threefold for more: the pair whose worse ratio
    to the fastest kernel of its row count is smallest wins, then the faster one-row kernel.
    """
    one, few = timings["1"], timings[str(FEW_ROWS)]
    # Kernels that read the same copy; an attention candidate (a cache dtype) pairs with itself.
    pairs = [(a, b) for a in one for b in few if COPY.get(a, a) == COPY.get(b, b)]
    if not pairs:
        return "linear/linear"  # nothing could be timed: what the plain model runs
    best_one, best_few = min(one[a] for a, _ in pairs), min(few[b] for _, b in pairs)
    return "/".join(min(pairs, key=lambda pair: (max(one[pair[0]] / best_one, few[pair[1]] / best_few),
                                                  one[pair[0]])))


def machine() -> dict[str, object]:
    """What the cache is keyed by. It only says where the decisions hold; they come from timings."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return {"cpu": names[0] if names else "unknown", "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_file() -> Path:
    """`cache_root()`/decoding-kernels/<hash of `machine()`>.json"""
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "decoding-kernels" / f"{digest}.json"


def foreign_share(run: Callable[[], dict]) -> tuple[dict, float]:
    """What `run` returns, and the share of the machine's CPUs that other work used meanwhile (0 off Linux)."""

    def busy() -> float:  # CPU seconds of the whole machine: all processes, and steal; off Linux only this one's
        if not Path("/proc/stat").exists():
            return time.process_time()
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")

    before, own, start = busy(), time.process_time(), time.perf_counter()
    result = run()
    others = busy() - before - (time.process_time() - own)
    return result, max(0.0, others) / ((time.perf_counter() - start) * (os.cpu_count() or 1))


def usable(entry: object) -> bool:
    """Whether a cached entry holds a decision that can be read (a damaged one is measured again)."""
    try:
        one = one_row(entry["kernels"])
        return (one in COPY or one in DTYPES) and isinstance(entry["seconds"]["1"][one], float)
    except (TypeError, KeyError, AttributeError):
        return False


_lock = threading.Lock()
_uncached: dict[Path, dict[str, dict]] = {}  # decisions this process measured but could not cache


def ensure_measured(shapes: Mapping[Shape, int], dtypes: list[torch.dtype]) -> tuple[dict[str, dict], str]:
    """Every (shape, dtype)'s entry, from the cache or measured now, and a note on where they came from."""
    with _lock:
        path, cached = cache_file(), {}
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):  # none yet, or damaged: measured again
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["version"] == CACHE_VERSION and data["machine"] == machine():
                cached = {key: entry for key, entry in dict(data["shapes"]).items() if usable(entry)}
        known = {**cached, **_uncached.get(path, {})}
        missing = {dtype: {shape: count for shape, count in shapes.items() if shape.key(dtype) not in known}
                   for dtype in dtypes}
        if not any(missing.values()):
            in_file = all(shape.key(dtype) in cached for dtype in dtypes for shape in shapes)
            return known, f"cached in {path}" if in_file else "measured earlier in this process, not cached"

        def measure() -> dict[str, dict]:
            return {shape.key(dtype): {"kernels": decide(timings), "seconds": timings}
                    for dtype, wanted in missing.items() for shape, timings in time_candidates(wanted, dtype).items()}

        start = time.perf_counter()
        fresh, busy = foreign_share(measure)
        note = f"measured in {time.perf_counter() - start:.1f} s"
        disturbed = busy > BUSY_LIMIT
        if disturbed:  # kept for this process's kernels, not cached; `decoding_dtype` does not trust it
            fresh = {key: {**entry, "disturbed": True} for key, entry in fresh.items()}
        known.update(fresh)
        reason = f"other work used {100 * busy:.0f}% of the CPUs meanwhile"
        if not disturbed:
            data = {"version": CACHE_VERSION, "machine": machine(), "shapes": {**cached, **fresh}}
            reason = f"{path} could not be written"
            with contextlib.suppress(OSError):
                atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
                return known, f"{note}, cached in {path}"
        _uncached.setdefault(path, {}).update(fresh)
        return known, f"{note}; not cached: {reason}"


def choose_kernels(shapes: Mapping[Shape, int], dtype: torch.dtype, force: str | None = None) -> dict[Shape, str]:
    """ "ONE/MORE" kernels of every shape, measured or cached, or `force`d; says which on stderr.

    A forced kernel is every Linear's; the KV cache then keeps the weights' dtype, as the plain model.
    """
    if force is not None:
        chosen = {shape: "/".join(kernel_pair(force, shape.tied)) if isinstance(shape, LinearShape)
                  else f"{DTYPE_NAMES[dtype]}/{DTYPE_NAMES[dtype]}" for shape in shapes}
        note = "forced"
    else:
        known, note = ensure_measured(shapes, [dtype])
        chosen = {shape: known[shape.key(dtype)]["kernels"] for shape in shapes}
    summary = ", ".join(f"{kernels} for {shape.label()}" for shape, kernels in chosen.items())
    print(f"decoding kernels for this machine ({note}): {DTYPE_NAMES[dtype]} one row / more rows: {summary}",
          file=sys.stderr)
    return chosen


def decoding_dtype(config: GPT2Config | None = None) -> torch.dtype:
    """bf16 if a batch-1 decode step's products and attention (`config`'s shapes, GPT-2 Small's by default) run
    faster than in fp32."""
    shapes = decoding_shapes(empty_model(config or GPT2Config()))
    known, note = ensure_measured(shapes, [torch.float32, torch.bfloat16])
    step = {}
    for dtype in (torch.float32, torch.bfloat16):
        entries = [(count, known[shape.key(dtype)]) for shape, count in shapes.items()]
        step[dtype] = sum(count * entry["seconds"]["1"][one_row(entry["kernels"])] for count, entry in entries)
    chosen = torch.bfloat16 if step[torch.bfloat16] < step[torch.float32] else torch.float32
    why = ""
    if any(known[shape.key(dtype)].get("disturbed") for dtype in step for shape in shapes):
        # Timings taken under load can flip from run to run, and the dtype changes the text a --seed gives.
        chosen, why = torch.float32, " (other work disturbed the measurement: fp32 until a quiet one is cached)"
    print(f"decoding dtype for this machine ({note}): {DTYPE_NAMES[chosen]}{why}; a step's products and attention "
          f"take {1e3 * step[torch.bfloat16]:.1f} ms in bf16, {1e3 * step[torch.float32]:.1f} ms in fp32",
          file=sys.stderr)
    return chosen


def optimize_for_decoding(model: GPT2, kernel: str | None = None) -> GPT2:
    """Hold a built model's Linears and choose its KV cache's dtype (`model.kv_cache_dtype`) as this machine
    decodes fastest (`kernel`: forced); returns it in eval mode."""
    if getattr(model, "optimized_for_decoding", False):
        return model
    model.eval()  # decoding only: no dropout
    embedding = model.transformer.wte
    shapes = decoding_linears(model)
    cache_dtype = embedding.weight.dtype
    if embedding.weight.device.type == "cpu":
        chosen = choose_kernels(decoding_shapes(model), embedding.weight.dtype, force=kernel)
        for (parent, name), shape in shapes.items():
            module = DecodingLinear(getattr(parent, name), chosen[shape], embedding if shape.tied else None)
            setattr(parent, name, module)
        cache_dtype = kv_cache_dtype(chosen[AttentionShape(model.config.n_head, model.config.head_dim)])
    else:  # a GPU's kernels read row-major weights fastest
        for linear in (getattr(parent, name) for parent, name in shapes):
            linear.weight.data = linear.weight.data.contiguous()
    hold_kv_cache_in(model, cache_dtype)
    model.optimized_for_decoding = True  # it can only decode now: gpt2kids.hf.export refuses it
    return model


def weights_dtype_for_inference(name: str, device: torch.device, config: GPT2Config | None = None) -> torch.dtype:
    """Decoding holds the weights in the chosen dtype (autocast would re-cast them every step).

    `auto`: on CPU the faster dtype for a decode step of `config`'s shapes, measured once and cached
    (`decoding_dtype`); on CUDA bf16 where the GPU supports it; elsewhere fp32.
    """
    check_inference_precision(name, device)
    if name == "auto":
        if device.type == "cpu":
            return decoding_dtype(config)
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return DTYPES[name]


def check_inference_precision(name: str, device: torch.device) -> None:
    """Raise `UserError` for a precision that cannot hold weights on `device` (before anything loads)."""
    check_precision(name)
    if name == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")

"""gpt2kids.decoding_kernels: every kernel computes the Linear, choices are measured and cached."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import torch
from torch import nn

from gpt2kids import decoding_kernels as decoding
from gpt2kids.config import GPT2Config
from gpt2kids.decode_loop import generate
from gpt2kids.decoding_kernels import (
    FEW_ROWS,
    DecodingLinear,
    LinearShape,
    choose_kernels,
    decide,
    decoding_dtype,
    kernel_pair,
    optimize_for_decoding,
    weights_dtype_for_inference,
)
from gpt2kids.errors import UserError
from gpt2kids.hf import empty_model, export, load_model, to_hf_state_dict
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model import GPT2, KVCache

VOCAB = 101  # odd, like GPT-2's 50257: the last block of a split layout is padded
EOS = VOCAB - 1  # conftest's hf_model puts end-of-text last
TINY = dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4)
KERNELS = ["linear", "mv", "split", "bag", "packed"]
# For the tied head every one-row kernel of the padded column-major copy meets each kernel for more rows.
TIED_KERNELS = ["linear", "mv", "packed",
                *[f"{one}/{more}" for one in ("cols", "split", "bag") for more in ("cols", "split")]]


@contextlib.contextmanager
def threads(count: int):
    """split and bag hold one block per thread: with 3, a width of 101 pads the last block (101 = 3 x 34 - 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """Measurements count as undisturbed here: whether a busy machine's result is cached is tested on its own."""
    monkeypatch.setattr(decoding, "foreign_share", lambda run: (run(), 0.0))
    decoding._uncached.clear()


def expected_error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         exact: torch.Tensor) -> torch.Tensor:
    """How far a correct kernel may be from the exact (float64) result of the same inputs.

    Every kernel sums the products in fp32, in some order: at most in_features x 2^-24 of the sum of
    |products| (bounded here by 1e-5 of it). In bf16 the result is also rounded to bf16 (8 significant
    bits: 2^-8 of the value), at most twice when a kernel rounds the product before adding the bias.
    """
    magnitude = x.double().abs() @ weight.double().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    bound = 1e-5 * magnitude
    if x.dtype == torch.bfloat16:
        product = x.double() @ weight.double().t()
        bound = bound + 2.0**-8 * (product.abs() + exact.abs())
    return bound


def check_linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.inference_mode():
        y = module(x)
    exact = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    assert y.shape == exact.shape and y.dtype == x.dtype
    error = (y.double() - exact).abs()
    bound = expected_error_bound(x, weight, bias, exact)
    assert (error <= bound).all(), f"worst error {error.max():.3g}, allowed there {bound.flatten()[error.argmax()]:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS + 2], ids=["one-row", "few-rows", "many-rows"])
@pytest.mark.parametrize("out_features", [VOCAB, 64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("blocks", [torch.get_num_threads(), 3], ids=["blocks-per-thread", "3-blocks"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_computes_the_linear(kernel, blocks, bias, out_features, rows, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(24, out_features, bias=bias).to(dtype)
    weight, bias_values = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    with threads(blocks):
        module = DecodingLinear(linear, kernel)
    assert module.one_row == kernel
    x = torch.randn(rows, 1, 24).to(dtype)  # (batch, one token, width), as a decode step feeds it
    check_linear(module, x, weight, bias_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3], ids=["one-row", "few-rows"])
@pytest.mark.parametrize("kernel", TIED_KERNELS)
def test_every_kernel_computes_the_tied_head_and_the_embedding_still_reads_its_values(kernel, rows, dtype):
    torch.manual_seed(0)
    embedding = nn.Embedding(VOCAB, 24).to(dtype)
    head = nn.Linear(24, VOCAB, bias=False).to(dtype)
    head.weight = embedding.weight
    weight = embedding.weight.detach().clone()
    with threads(3):
        module = DecodingLinear(head, kernel, embedding)
    check_linear(module, torch.randn(rows, 1, 24).to(dtype), weight, None)
    if module.one_row in ("linear", "mv"):
        assert module.weight is embedding.weight  # no copy at all
    elif module.one_row == "packed":  # the embedding keeps its row-major weight; the head has its own copy
        assert torch.equal(embedding.weight, weight) and embedding.weight.is_contiguous()
    else:
        # The embedding reads the head's (padded, column-major) copy: one storage, the same values.
        assert embedding.weight.untyped_storage().data_ptr() == module.cols.untyped_storage().data_ptr()
        assert torch.equal(embedding.weight, weight)
        ids = torch.tensor([[0, 50, VOCAB - 1]])
        assert torch.equal(embedding(ids), weight[ids])


def test_unknown_kernels_are_refused():
    for bad in ("fast", "linear-2", "split-3", "cols/blas", "linear/mv/cols"):
        with pytest.raises(ValueError, match="unknown decoding kernel"):
            kernel_pair(bad, tied=False)


def test_a_forced_kernel_falls_back_where_it_cannot_read_the_weight():
    assert kernel_pair("packed", tied=True) == ("packed", "packed")  # a copy of its own beside the embedding's
    assert kernel_pair("cols", tied=False) == ("split", "split")  # column-major: the tied head only
    assert kernel_pair("bag/cols", tied=True) == ("bag", "cols")
    assert kernel_pair("bag/cols", tied=False) == ("bag", "split")
    assert kernel_pair("linear/mv", tied=False) == ("linear", "linear")  # mv runs one row only


def test_decide_keeps_the_pair_least_slower_than_the_fastest_for_one_row_or_more():
    # bag is the fastest for one row, but split, the kernel for more rows on its copy, is 3x the fastest:
    # mv/linear is at most 2x slower either way.
    timings = {"1": {"linear": 3.0, "mv": 2.0, "packed": 4.0, "split": 5.0, "bag": 1.0},
               str(FEW_ROWS): {"linear": 3.0, "packed": 6.0, "split": 9.0}}
    assert decide(timings) == "mv/linear"
    # packed: 1.5x the fastest for one row, the fastest for more rows; better than any pair 2x or 3x off.
    timings["1"]["packed"], timings[str(FEW_ROWS)]["packed"] = 1.5, 3.0
    assert decide(timings) == "packed/packed"
    # Equally far from the fastest: the faster one-row kernel breaks the tie.
    timings[str(FEW_ROWS)]["split"] = 4.5
    assert decide(timings) == "bag/split"
    # A kernel that could not run is missing from the timings: its copy is judged without it.
    del timings["1"]["bag"]
    assert decide(timings) == "packed/packed"
    # The tied head: cols and split read the same column-major copy, and pair either way.
    tied = {"1": {"linear": 2.0, "cols": 1.05, "split": 1.0, "bag": 1.2},
            str(FEW_ROWS): {"linear": 3.0, "cols": 2.0, "split": 2.5}}
    assert decide(tied) == "split/cols"
    # Nothing timed at all: what the plain model runs.
    assert decide({"1": {}, str(FEW_ROWS): {}}) == "linear/linear"


# --- the measurement and its cache ----------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Measurements go to a fresh cache folder and are counted."""
    monkeypatch.setenv("GPT2KIDS_CACHE", str(tmp_path))
    calls = []
    measure = decoding.time_candidates

    def counting(shapes, dtype):
        calls.extend((shape, dtype) for shape in shapes)  # one entry per shape measured
        return measure(shapes, dtype)

    monkeypatch.setattr(decoding, "time_candidates", counting)
    return calls


def tiny_shapes() -> dict[decoding.Shape, int]:
    return decoding.decoding_shapes(empty_model(GPT2Config(**TINY)))


def test_the_choice_is_measured_once_then_read_from_the_cache(counted, tmp_path, capfd):
    shapes = tiny_shapes()
    assert len(shapes) == 6  # c_attn, attn.c_proj, c_fc, mlp.c_proj, the tied head, the attention
    first = choose_kernels(shapes, torch.float32)
    assert len(counted) == len(shapes)
    line = capfd.readouterr().err
    assert line.startswith("decoding kernels for this machine (measured in ") and "cached in" in line
    assert line.count("\n") == 1 and "101x48 (tied head)" in line
    files = list((tmp_path / "decoding-kernels").glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["machine"] == decoding.machine()
    assert set(stored["shapes"]) == {shape.key(torch.float32) for shape in shapes}
    entry = stored["shapes"][LinearShape(VOCAB, 48, False, True).key(torch.float32)]
    assert set(entry["seconds"]["1"]) == {"linear", "mv", "packed", "cols", "split", "bag"}
    assert choose_kernels(shapes, torch.float32) == first
    assert len(counted) == len(shapes)  # no second measurement
    assert capfd.readouterr().err.startswith(f"decoding kernels for this machine (cached in {files[0]}): fp32")
    choose_kernels(shapes, torch.bfloat16)  # another dtype: measured and added to the same file
    assert len(counted) == 2 * len(shapes)
    assert len(json.loads(files[0].read_text())["shapes"]) == 2 * len(shapes)


def test_another_torch_version_or_thread_count_measures_again(counted, monkeypatch, tmp_path):
    shapes = tiny_shapes()
    choose_kernels(shapes, torch.float32)
    assert len(counted) == len(shapes)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", torch.__version__ + ".other")
        choose_kernels(shapes, torch.float32)
    assert len(counted) == 2 * len(shapes)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        choose_kernels(shapes, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert len(counted) == 3 * len(shapes)
    assert len(list((tmp_path / "decoding-kernels").glob("*.json"))) == 3
    choose_kernels(shapes, torch.float32)  # the first machine again: cached
    assert len(counted) == 3 * len(shapes)


def test_a_disturbed_measurement_is_used_but_not_cached(counted, monkeypatch, tmp_path, capfd):
    monkeypatch.setattr(decoding, "foreign_share", lambda run: (run(), 0.6))
    shapes = tiny_shapes()
    choose_kernels(shapes, torch.float32)
    assert "not cached: other work used 60% of the CPUs meanwhile" in capfd.readouterr().err
    assert not list(tmp_path.glob("decoding-kernels/*.json"))
    choose_kernels(shapes, torch.float32)  # this process keeps what it measured
    assert len(counted) == len(shapes)
    assert "(measured earlier in this process, not cached)" in capfd.readouterr().err


def test_a_damaged_cache_is_measured_again_and_rewritten(counted, tmp_path):
    path = decoding.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    choose_kernels(tiny_shapes(), torch.float32)
    assert len(counted) == len(tiny_shapes())
    assert json.loads(path.read_text())["machine"] == decoding.machine()


def test_a_cache_of_an_older_version_is_measured_again_and_rewritten(counted):
    shapes = tiny_shapes()
    choose_kernels(shapes, torch.float32)
    path = decoding.cache_file()
    stored = json.loads(path.read_text())
    stored["version"] = decoding.CACHE_VERSION - 1  # its entries may mean something else now
    path.write_text(json.dumps(stored))
    choose_kernels(shapes, torch.float32)
    assert len(counted) == 2 * len(shapes)
    assert json.loads(path.read_text())["version"] == decoding.CACHE_VERSION


def _drop_the_kernels(entry: dict) -> None:
    del entry["kernels"]


def _an_unknown_kernel(entry: dict) -> None:
    entry["kernels"] = "warp/linear"
    entry["seconds"]["1"]["warp"] = 1e-6  # timed, even: still no kernel this version knows


def _seconds_not_a_number(entry: dict) -> None:
    entry["seconds"]["1"][decoding.one_row(entry["kernels"])] = "fast"


@pytest.mark.parametrize("damage", [_drop_the_kernels, _an_unknown_kernel, _seconds_not_a_number])
def test_a_damaged_entry_in_a_whole_cache_is_measured_again(counted, tmp_path, damage):
    shapes = tiny_shapes()
    choose_kernels(shapes, torch.float32)
    path = decoding.cache_file()
    stored = json.loads(path.read_text())
    head = LinearShape(VOCAB, 48, False, True).key(torch.float32)
    damage(stored["shapes"][head])  # the file parses; one entry does not hold a decision
    path.write_text(json.dumps(stored))
    chosen = choose_kernels(shapes, torch.float32)
    assert len(counted) == len(shapes) + 1  # that entry alone was measured again
    assert "kernels" in json.loads(path.read_text())["shapes"][head]
    assert chosen[LinearShape(VOCAB, 48, False, True)]


def write_cache(step_seconds: dict[str, float]) -> None:
    """A cache in which each dtype's kernels take the given time per call."""
    shapes = tiny_shapes()
    entries = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for shape in shapes:
            entries[shape.key(dtype)] = {"kernels": "mv/linear",
                                         "seconds": {"1": {"mv": step_seconds[name], "linear": 1.0},
                                                     str(FEW_ROWS): {"linear": 1.0}}}
    path = decoding.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": decoding.CACHE_VERSION, "machine": decoding.machine(),
                                "shapes": entries}))


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(2e-3, 1e-3, torch.bfloat16), (1e-3, 2e-3, torch.float32),
                                                        (1e-3, 1e-3, torch.float32)])
def test_precision_auto_on_cpu_picks_the_dtype_that_decodes_faster(counted, capfd, fp32, bf16, expected):
    write_cache({"fp32": fp32, "bf16": bf16})
    config = GPT2Config(**TINY)
    assert decoding_dtype(config) == expected
    line = capfd.readouterr().err
    assert line.startswith("decoding dtype for this machine (cached in ")
    # 11 calls a step (4 Linears and the attention per layer, the head) at the cached time per call.
    assert f"{1e3 * 11 * bf16:.1f} ms in bf16, {1e3 * 11 * fp32:.1f} ms in fp32" in line
    assert weights_dtype_for_inference("auto", torch.device("cpu"), config) == expected
    assert not counted  # from the cache only
    assert weights_dtype_for_inference("fp32", torch.device("cpu"), config) == torch.float32
    assert weights_dtype_for_inference("bf16", torch.device("cpu"), config) == torch.bfloat16


def test_fp16_weights_on_cpu_are_refused():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        weights_dtype_for_inference("fp16", torch.device("cpu"))


# --- the optimized model --------------------------------------------------------------------------

def tiny_pair(dtype: torch.dtype, kernel: str | None, seed: int = 1) -> tuple[GPT2, GPT2]:
    torch.manual_seed(seed)
    plain = GPT2(GPT2Config(**TINY)).to(dtype).eval()
    optimized = GPT2(GPT2Config(**TINY)).to(dtype).eval()
    optimized.load_state_dict(plain.state_dict())
    with threads(3 if kernel else torch.get_num_threads()):  # forced: a padded last block
        return plain, optimize_for_decoding(optimized, kernel)


@pytest.mark.parametrize("kernel", [None, *TIED_KERNELS])
def test_optimized_model_gives_the_plain_greedy_tokens_in_fp32(counted, kernel):
    plain, optimized = tiny_pair(torch.float32, kernel)
    settings = SamplingSettings(max_new_tokens=20, greedy=True)
    for prompts in ([[3, 4, 5]], [[3, 4, 5], [7], [9, 8]]):  # one row per step; a padded batch of three
        assert generate(optimized, prompts, settings, EOS, stop_at_eos=False) == \
            generate(plain, prompts, settings, EOS, stop_at_eos=False)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.inference_mode():
        # fp32 sums in another order: 1e-5 of the logits' scale covers it, a wrong product does not pass.
        torch.testing.assert_close(optimized(ids), plain(ids), rtol=1e-5, atol=1e-5)


def step_logits(model: GPT2, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one decode step (one token per row) after a prefill of the rest: what generate runs."""
    with torch.inference_mode():
        dtype = getattr(model, "kv_cache_dtype", model.transformer.wte.weight.dtype)
        cache = KVCache(model.config, ids.shape[0], ids.shape[1], "cpu", dtype)
        model(ids[:, :-1], kv_cache=cache)
        return model(ids[:, -1:], kv_cache=cache).float()


@pytest.mark.parametrize("kernel", [None, *TIED_KERNELS])
@pytest.mark.parametrize("batch", [1, 3], ids=["single-prompt", "batch"])
def test_optimized_bf16_logits_stay_within_bf16_rounding(counted, kernel, batch):
    plain, optimized = tiny_pair(torch.bfloat16, kernel)
    exact = GPT2(GPT2Config(**TINY)).eval()
    exact.load_state_dict({key: value.float() for key, value in plain.state_dict().items()})
    ids = torch.randint(0, VOCAB, (batch, 6))
    reference = step_logits(exact, ids)  # the same bf16 weights, computed in fp32
    plain_error = (step_logits(plain, ids) - reference).abs().max()
    optimized_error = (step_logits(optimized, ids) - reference).abs().max()
    # The optimized model rounds the same values to bf16, only after summing in another order: its
    # distance from the fp32 computation is of the plain bf16 model's size (2x leaves room for the
    # order), while a wrong product would be off by the logits' own size.
    assert plain_error > 0
    assert optimized_error <= 2 * plain_error, (optimized_error, plain_error)


def test_attention_over_an_fp32_kv_cache_keeps_bf16_logits_within_bf16_rounding():
    plain, _ = tiny_pair(torch.bfloat16, "linear")
    exact = GPT2(GPT2Config(**TINY)).eval()
    exact.load_state_dict({key: value.float() for key, value in plain.state_dict().items()})
    ids = torch.randint(0, VOCAB, (3, 6))
    reference = step_logits(exact, ids)
    plain_error = (step_logits(plain, ids) - reference).abs().max()
    decoding.hold_kv_cache_in(plain, torch.float32)  # each query cast up, the attention's output back
    wide_error = (step_logits(plain, ids) - reference).abs().max()
    assert 0 < wide_error <= 2 * plain_error, (wide_error, plain_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kv_cache_dtype_is_measured_with_the_kernels_and_a_forced_kernel_keeps_the_weights_dtype(
        counted, capfd, dtype):
    attention = decoding.AttentionShape(TINY["n_head"], TINY["n_embd"] // TINY["n_head"])
    timings = decoding.time_attention(attention, dtype)
    candidates = {"fp32"} if dtype == torch.float32 else {"bf16", "fp32"}  # fp32 weights: one candidate
    assert all(set(seconds) == candidates and min(seconds.values()) > 0 for seconds in timings.values())
    for faster in candidates:  # a cache in which `faster` attends in half the time of the other
        entry = {rows: {name: 1.0 if name == faster else 2.0 for name in candidates} for rows in ("1", str(FEW_ROWS))}
        path = decoding.cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": decoding.CACHE_VERSION, "machine": decoding.machine(), "shapes": {
            attention.key(dtype): {"kernels": decide(entry), "seconds": entry}}}))
        _, model = tiny_pair(dtype, None)
        assert model.kv_cache_dtype == decoding.DTYPES[faster]
        assert f"{faster}/{faster} for the KV cache of attention 4x12" in capfd.readouterr().err
    _, forced = tiny_pair(dtype, "packed")
    assert forced.kv_cache_dtype == dtype


def test_the_hf_folder_loads_and_decodes_like_the_plain_model(counted, hf_checkpoint):
    _, folder = hf_checkpoint(**TINY)
    plain, _ = load_model(folder)
    optimized, _ = load_model(folder)
    optimize_for_decoding(optimized)  # HF's Conv1D weights arrive transposed: every layout copes
    settings = SamplingSettings(max_new_tokens=20, greedy=True)
    prompts = [[3, 4, 5], [7]]
    assert generate(optimized, prompts, settings, EOS) == generate(plain.eval(), prompts, settings, EOS)


@pytest.mark.parametrize("kernel", [None, "linear", "mv", "bag/cols", "split/split", "packed"])
def test_two_threads_decoding_at_once_get_what_each_gets_alone(counted, monkeypatch, kernel):
    _, model = tiny_pair(torch.bfloat16, kernel, seed=2)

    def forbidden(value: bool) -> None:
        raise AssertionError("decoding flipped torch.backends.mkldnn.enabled, a process-wide switch")

    monkeypatch.setattr(type(torch.backends.mkldnn), "enabled",
                        torch.backends.ContextProp(torch._C._get_mkldnn_enabled, forbidden))
    settings = SamplingSettings(max_new_tokens=30, greedy=True)
    prompts = {"a": [[3, 4, 5]], "b": [[11, 12], [13]]}  # one row a step, and a batch of two
    alone = {name: generate(model, rows, settings, EOS, stop_at_eos=False) for name, rows in prompts.items()}
    start = threading.Barrier(2)
    together: dict[str, list] = {}
    errors = []

    def decode(name: str) -> None:
        try:
            start.wait()
            together[name] = [generate(model, prompts[name], settings, EOS, stop_at_eos=False) for _ in range(3)]
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=decode, args=(name,)) for name in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name, results in together.items():
        assert all(result == alone[name] for result in results)


def test_optimizing_twice_changes_nothing_more(counted):
    _, optimized = tiny_pair(torch.float32, "bag")
    head = optimized.lm_head
    assert optimize_for_decoding(optimized, "linear").lm_head is head


def test_export_refuses_a_decoding_optimized_model(counted, tmp_path):
    _, optimized = tiny_pair(torch.float32, "split")
    with pytest.raises(UserError, match="optimize_for_decoding"):
        to_hf_state_dict(optimized)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old export")
    with pytest.raises(UserError, match="optimize_for_decoding"):
        export(optimized, None, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old export"  # the old folder is untouched


def test_precision_auto_keeps_fp32_when_other_work_disturbed_the_measurement(counted, monkeypatch, capfd):
    def timings_favouring_bf16(shapes, dtype):
        seconds = 1e-3 if dtype == torch.bfloat16 else 2e-3
        return {shape: ({"1": {"bf16": seconds, "fp32": seconds}, str(FEW_ROWS): {"bf16": seconds, "fp32": seconds}}
                        if isinstance(shape, decoding.AttentionShape) else
                        {"1": {"linear": seconds}, str(FEW_ROWS): {"linear": seconds}}) for shape in shapes}

    monkeypatch.setattr(decoding, "time_candidates", timings_favouring_bf16)
    config = GPT2Config(**TINY)
    monkeypatch.setattr(decoding, "foreign_share", lambda run: (run(), 0.6))
    # Timings under load may flip between runs, and with them the text a --seed gives: fp32, said so.
    assert decoding_dtype(config) == torch.float32
    assert "fp32 (other work disturbed the measurement" in capfd.readouterr().err
    decoding._uncached.clear()
    monkeypatch.setattr(decoding, "foreign_share", lambda run: (run(), 0.0))
    assert decoding_dtype(config) == torch.bfloat16  # a quiet measurement decides, and is cached
    assert decoding_dtype(config) == torch.bfloat16
    assert "cached in" in capfd.readouterr().err.splitlines()[-1]

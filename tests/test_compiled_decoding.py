"""`generate --compile`: the compiled decode step computes what the eager model does."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise

from gpt2kids import compiled_decoding
from gpt2kids.compiled_decoding import compile_decode_step
from gpt2kids.config import GPT2Config
from gpt2kids.decode_loop import generate, next_token_logits
from gpt2kids.errors import UserError
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model import GPT2, KVCache

VOCAB = 101
EOS = VOCAB - 1
ONE_LAYER = dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=1, n_head=4)  # compiles in seconds


@pytest.fixture(autouse=True)
def _cpp_kernels_only(monkeypatch):
    # The C++ GEMM template alone: its kernels are the ones eager PyTorch never runs, and with one
    # candidate max-autotune has nothing to time, which would take seconds per shape.
    monkeypatch.setitem(compiled_decoding.CPU_OPTIONS, "max_autotune_gemm_backends", "CPP")


def plain_and_compiled(dtype: torch.dtype) -> tuple[GPT2, GPT2]:
    torch.manual_seed(3)
    plain = randomise(GPT2(GPT2Config(**ONE_LAYER))).to(dtype).eval()
    compiled = GPT2(GPT2Config(**ONE_LAYER)).to(dtype)
    compiled.load_state_dict(plain.state_dict())
    return plain, compile_decode_step(compiled)


def step_logits(model: GPT2, ids: torch.Tensor) -> list[torch.Tensor]:
    """The logits of every decode step after a 2-token prompt, through the step `generate` would use."""
    step = getattr(model, "compiled_decode_step", None)
    dtype = getattr(model, "kv_cache_dtype", model.transformer.wte.weight.dtype)
    with torch.inference_mode():
        cache = KVCache(model.config, ids.shape[0], ids.shape[1], "cpu", dtype)
        next_token_logits(model, ids[:, :2], cache, None, None)
        if step is None:
            return [next_token_logits(model, ids[:, i:i + 1], cache, None, None) for i in range(2, ids.shape[1])]
        return [step(ids[:, i:i + 1], cache, None, None) for i in range(2, ids.shape[1])]


def recorded_steps(model: GPT2, prompts: list[list[int]], settings: SamplingSettings) -> tuple[list, list]:
    """(the new tokens, the logits of every decode step) of `generate`, through the step it would use."""
    compiled = getattr(model, "compiled_decode_step", None)
    step = compiled or (lambda *inputs: next_token_logits(model, *inputs))
    logits = []
    model.compiled_decode_step = lambda *inputs: logits.append(step(*inputs)) or logits[-1]
    try:
        return generate(model, prompts, settings, EOS, stop_at_eos=False), logits
    finally:
        if compiled is None:
            del model.compiled_decode_step
        else:
            model.compiled_decode_step = compiled


def test_compiled_step_gives_the_eager_logits_and_greedy_tokens_in_fp32(capfd):
    plain, compiled = plain_and_compiled(torch.float32)
    assert "compiled the decode step in" in capfd.readouterr().err
    settings = SamplingSettings(max_new_tokens=12, greedy=True)
    with torch.compiler.set_stance("fail_on_recompile"):  # one prompt runs the graph compiled at load
        tokens, _ = recorded_steps(compiled, [[3, 4, 5]], settings)
        # Up to a full context: the step that fills the cache runs eager instead of compiling again.
        recorded_steps(compiled, [[3, 4, 5]], SamplingSettings(max_new_tokens=ONE_LAYER["n_positions"], greedy=True))
    for prompts in ([[3, 4, 5]], [[3, 4, 5], [7], [9, 8]]):  # one row; a padded batch (compiled on first use)
        tokens, logits = recorded_steps(compiled, prompts, settings)
        eager_tokens, eager_logits = recorded_steps(plain, prompts, settings)
        assert tokens == eager_tokens
        assert len(logits) == settings.max_new_tokens - 1
        for ours, eager in zip(logits, eager_logits, strict=True):
            # fp32 sums in another order: 1e-5 of the logits' scale covers it, a wrong product does not pass.
            torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


def test_compiled_bf16_step_stays_within_bf16_rounding():
    plain, compiled = plain_and_compiled(torch.bfloat16)
    exact = GPT2(GPT2Config(**ONE_LAYER)).eval()
    exact.load_state_dict({key: value.float() for key, value in plain.state_dict().items()})
    ids = torch.randint(0, VOCAB, (1, 8))
    reference = torch.stack(step_logits(exact, ids))  # the same bf16 weights, computed in fp32
    plain_error = (torch.stack(step_logits(plain, ids)) - reference).abs().max()
    compiled_error = (torch.stack(step_logits(compiled, ids)) - reference).abs().max()
    # The compiled step rounds the same values to bf16 after summing in its own order (its KV cache
    # may be fp32): within twice the plain bf16 model's distance; a wrong product is off by the logits' size.
    assert plain_error > 0
    assert compiled_error <= 2 * plain_error, (compiled_error, plain_error)


def test_a_failed_compile_is_one_line_naming_the_way_out(monkeypatch):
    def failing_compile(function, **options):
        def compiled(*args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n" + "details\n" * 100)
        return compiled

    monkeypatch.setattr(compiled_decoding.torch, "compile", failing_compile)
    model = GPT2(GPT2Config(**ONE_LAYER))
    with pytest.raises(UserError, match=r"--compile failed \(InductorError: CppCompileError: C\+\+ compile error\); "
                                        r"run without --compile") as error:
        compile_decode_step(model)
    assert "\n" not in str(error.value)
    assert not hasattr(model, "compiled_decode_step")

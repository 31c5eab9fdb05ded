"""The CUDA paths: HF parity, training steps in bf16 and fp16, --compile, greedy decoding against transformers,
the compiled decode step.

Marked `cuda` and deselected by default (pyproject's addopts: -m "not cuda"), so CPU runs neither
run nor skip them. Run them on a GPU with `pytest -m cuda tests/test_cuda.py` (bench/cuda_check.sh does).
With GPT2KIDS_CUDA_TESTS_ON=cpu they rehearse on the CPU (tests/test_cuda_rehearsal.py, and
cuda_check.sh --dry-run): every line of them runs, so a GPU's scarce minutes are not spent finding that a
test no longer matches the package; what only a GPU can show (its kernels, its numerics) still needs one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import BF16_LOGIT_TOLERANCE, REPO, config_for, final_weights, hf_model
from safetensors.torch import load_file

from gpt2kids import data
from gpt2kids.hf import load_model
from gpt2kids.tokenizer import Tokenizer
from gpt2kids.training import optimizer_step, prepare_run, train

pytestmark = pytest.mark.cuda

CUDA = torch.device(os.environ.get("GPT2KIDS_CUDA_TESTS_ON", "cuda"))
REHEARSAL = CUDA.type == "cpu"
CONFIG = dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4)
BF16 = REHEARSAL or torch.cuda.is_bf16_supported()


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    # A fixture, not a module-level skip: deselected by default, these tests are not even skipped on CPU.
    if not REHEARSAL and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("config", [CONFIG, dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                                                 n_head=12)], ids=["tiny", "gpt2-small"])
def test_logits_match_transformers_on_cuda_in_fp32(tmp_path, config):
    reference = hf_model(**config).to(CUDA)
    reference.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path, CUDA)
    ids = torch.randint(0, config["vocab_size"], (2, 48), device=CUDA)
    expected, got = logits(reference, ids), logits(ours.eval(), ids)
    # Both are fp32 throughout (TF32 matmuls are off by default), but run other kernels in another
    # order (ours: causal SDPA without a mask): fp32 sums of up to 3072 terms agree to ~1e-5 relative,
    # and errors compound over 12 layers; 1e-4 of the logits' scale bounds that, a wrong model is far off.
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.skipif(not BF16, reason="this GPU has no bf16")
def test_logits_match_transformers_on_cuda_in_bf16(tmp_path):
    reference = hf_model(**CONFIG).to(CUDA)
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 48), device=CUDA)
    exact = logits(reference, ids)
    theirs = logits(hf_model(**CONFIG).to(CUDA, torch.bfloat16), ids)  # the same seeded weights
    ours, _ = load_model(tmp_path, CUDA, torch.bfloat16)
    mine = logits(ours.eval(), ids)
    # Both round the same weights to bf16 and compute in bf16 with fp32 accumulation; neither is
    # exact. Ours must be as close to the fp32 computation as transformers' own bf16 model is (2x
    # leaves room for another summation order); a wrong computation is off by the logits' size.
    assert (mine - exact).abs().max() <= 2 * (theirs - exact).abs().max()


@pytest.mark.skipif(not BF16, reason="this GPU has no bf16")
def test_bf16_training_on_cuda_lowers_the_loss(tmp_path, init_folder, corpus):
    progress = train(config_for(init_folder, corpus, tmp_path / "run", device=CUDA.type, precision="bf16", epochs=2))
    assert progress.history[-1]["train_loss"] < progress.history[0]["train_loss"]
    assert progress.history[-1]["eval_loss"] < progress.history[0]["eval_loss"]


def test_fp32_training_on_cuda_keeps_its_matmuls_in_fp32(tmp_path, init_folder, corpus):
    # --precision fp32 means fp32: no TF32 switched on behind the user's back (process-wide, at that).
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default
    prepare_run(config_for(init_folder, corpus, tmp_path / "run", device=CUDA.type, precision="fp32"))
    assert not torch.backends.cuda.matmul.allow_tf32


def test_fp16_with_the_grad_scaler_on_cuda_trains_and_skips_overflowing_steps(tmp_path, init_folder, corpus):
    config = config_for(init_folder, corpus, tmp_path / "run", device=CUDA.type, precision="fp16", max_steps=4)
    assert train(config).step == 4
    trainer = prepare_run(config_for(init_folder, corpus, tmp_path / "probe", device=CUDA.type, precision="fp16"))
    before = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    scale = trainer.scaler.get_scale()
    forward = trainer.forward
    trainer.forward = lambda *args, **kwargs: forward(*args, **kwargs) * float("inf")
    order = data.epoch_order(len(trainer.dataset.train), 3, 0)
    assert not optimizer_step(trainer, trainer.plan.step_blocks(order, 0)).applied
    assert trainer.scaler.get_scale() < scale
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    trainer.forward = forward
    assert optimizer_step(trainer, trainer.plan.step_blocks(order, 1)).applied


def test_compiled_training_on_cuda_matches_eager(tmp_path, init_folder, corpus):
    settings = dict(device=CUDA.type, precision="fp32", max_steps=3, dropout=0.0, eval_every=3)
    eager = train(config_for(init_folder, corpus, tmp_path / "eager", **settings))
    compiled = train(config_for(init_folder, corpus, tmp_path / "compiled", compile=True, **settings))
    assert eager.step == compiled.step == 3
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    # The same fp32 arithmetic in fused kernels: the order of sums moves the last bits of 3 Adam steps.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(a["transformer.wte.weight"], load_file(init_folder / "model.safetensors")
                           ["transformer.wte.weight"])


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(not BF16,
                                                                                            reason="no bf16"))])
def test_greedy_generate_py_on_cuda_gives_the_tokens_of_transformers(model_folder, precision):
    from transformers import GPT2LMHeadModel

    prompt, steps = "Pada suatu hari", 20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "generate.py", prompt, "--model", str(model_folder), "--greedy",
                             "--format", "jsonl", "--max-new-tokens", str(steps), "--precision", precision,
                             "--device", CUDA.type], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    tokenizer = Tokenizer.from_path(model_folder)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    reference = GPT2LMHeadModel.from_pretrained(model_folder, dtype=dtype).to(CUDA).eval()
    ids = torch.tensor([tokenizer.encode(prompt)], device=CUDA)
    with torch.inference_mode():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                                 pad_token_id=-1, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    if precision == "bf16":
        # Both sides round to bf16 and sum in their own orders (ours keeps an fp32 KV cache where the
        # machine is faster with one): the tokens must agree up to the first step whose best two logits
        # are closer than a few bf16 roundings of the logits' scale (as tests/test_generate.py on CPU).
        logits = torch.cat(out.logits).float()
        top2 = logits.topk(2, dim=-1).values
        scale = logits.abs().amax(dim=-1).clamp(min=1.0)
        clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_LOGIT_TOLERANCE * scale
        tokens = tokens[:int(clear.long().cumprod(0).sum())]
    new = tokens[:tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens
    assert len(new) >= (10 if precision == "fp32" else 5)  # a real continuation, not an early end-of-text
    if precision == "fp32":
        assert record["completion"] == tokenizer.decode(new)
    else:
        assert record["completion"].startswith(tokenizer.decode(new))


def test_compiled_decode_step_on_cuda_gives_the_eager_logits_and_greedy_tokens():
    from gpt2kids.compiled_decoding import compile_decode_step
    from gpt2kids.config import GPT2Config
    from gpt2kids.decode_loop import generate
    from gpt2kids.logits_processors import SamplingSettings
    from gpt2kids.model import GPT2

    torch.manual_seed(3)
    plain = GPT2(GPT2Config(**CONFIG)).to(CUDA).eval()
    compiled = GPT2(GPT2Config(**CONFIG)).to(CUDA)
    compiled.load_state_dict(plain.state_dict())
    compile_decode_step(compiled)
    settings = SamplingSettings(max_new_tokens=20, greedy=True)
    eos = CONFIG["vocab_size"] - 1
    with torch.compiler.set_stance("fail_on_recompile"):  # one prompt runs the graph compiled at load
        tokens = generate(compiled, [[3, 4, 5]], settings, eos, stop_at_eos=False)
    assert tokens == generate(plain, [[3, 4, 5]], settings, eos, stop_at_eos=False)


@pytest.mark.parametrize("autocast", [False, pytest.param(True, marks=pytest.mark.skipif(not BF16, reason="no bf16"))],
                         ids=["fp32", "bf16-autocast"])
def test_the_chunked_loss_on_cuda_equals_the_full_logits_in_whole_chunks(autocast):
    """On a GPU the softmax and the weight gradient run on whole chunks (no blocks of rows, as on CPU)."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from gpt2kids.loss import linear_cross_entropy

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.logsumexps = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.logsumexps += func is torch.ops.aten.logsumexp.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    rows, width, vocab = 300, 64, 50257  # 50257: on CPU a 41-row block; here 300 rows in 3 chunks of 100
    hidden = torch.randn(rows, width, device=CUDA)
    weight = torch.randn(vocab, width, device=CUDA) * 0.3
    targets = torch.randint(0, vocab, (rows,), device=CUDA)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=autocast), Count() as count:
        loss, _ = linear_cross_entropy(h, w, targets, chunk_tokens=100)
    if not REHEARSAL:  # the CPU runs blocks of rows
        assert count.logsumexps == 3  # one per chunk
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=autocast):
        logits = F.linear(h2, w2)
    expected = F.cross_entropy(logits.float(), targets, reduction="sum")
    expected.backward()
    # fp32: the same sums in another order; bf16: the same bf16 logits, gradients rounded to bf16 before
    # each matmul (as tests/test_loss.py bounds it on CPU).
    bound = 1e-5 if not autocast else 4 * 2.0 ** -8
    torch.testing.assert_close(loss, expected, rtol=bound, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=bound, atol=bound)
    torch.testing.assert_close(w.grad, w2.grad, rtol=bound, atol=bound)

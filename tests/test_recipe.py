"""The training recipe as the README states it: defaults, weight decay, clipping, held-out sets, fp16 give-up.

Each test checks a value that a plausible wrong implementation would not give.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import REPO, SAMPLE_TEXTS, config_for

from gpt2kids import data
from gpt2kids.config import GPT2Config
from gpt2kids.errors import UserError
from gpt2kids.generate_config import build_parser as build_generate_parser
from gpt2kids.model import GPT2
from gpt2kids.optimizer import lr_lambda, make_optimizer
from gpt2kids.train_config import build_parser as build_train_parser
from gpt2kids.train_config import parse_args as parse_train_args
from gpt2kids.training import MAX_SKIPPED_STEPS, TrainingDiverged, evaluate, optimizer_step, run_epochs, train
from gpt2kids.training import prepare_run as build_trainer

README = (REPO / "README.md").read_text(encoding="utf-8")


def tiny_model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=2, n_head=2))


def first_step(trainer):
    order = data.epoch_order(len(trainer.dataset.train), trainer.config.seed, 0)
    return optimizer_step(trainer, trainer.plan.step_blocks(order, 0))


# --- weight decay ----------------------------------------------------------------------------------

def weight_names(layers: int) -> set[str]:
    """The 2-D weights: both embeddings and the four Linear weights of every block."""
    per_block = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return {"transformer.wte.weight", "transformer.wpe.weight",
            *(f"transformer.h.{i}.{name}" for i in range(layers) for name in per_block)}


@pytest.mark.parametrize("device", ["cpu", "mps"])  # mps: the non-fused (foreach) AdamW, built on CPU tensors
def test_weight_decay_applies_to_the_2d_weights_only(device):
    model = tiny_model()
    names = {id(p): name for name, p in model.named_parameters()}  # the tied lm_head appears once, as wte
    lr, decay = 0.1, 0.5
    optimizer = make_optimizer(model, lr, decay, torch.device(device))
    grouped = {name: group["weight_decay"] for group in optimizer.param_groups for name in map(
        lambda p: names[id(p)], group["params"])}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(names)  # each parameter once
    assert {name for name, wd in grouped.items() if wd == decay} == weight_names(2)
    others = set(names.values()) - weight_names(2)
    assert others and all(name.endswith(".bias") or ".ln_" in name for name in others)
    assert {grouped[name] for name in others} == {0.0}

    # One step with zero gradients: Adam's update is 0, so only the decoupled decay moves anything.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p))  # biases start at 0 and LayerNorm weights at 1: make decay visible
            p.grad = torch.zeros_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        if name in weight_names(2):
            # w * (1 - lr * wd) in fp32: a couple of roundings, each within 2**-24 of the value.
            torch.testing.assert_close(p, before[name] * (1 - lr * decay), rtol=2**-21, atol=0, msg=name)
            # Not L2 regularisation added to the gradient, which Adam would turn into steps of about lr.
            assert not torch.allclose(p, before[name] - lr * before[name].sign(), rtol=1e-3, atol=0)
        else:
            assert torch.equal(p, before[name]), f"{name} was decayed"


# --- clipping --------------------------------------------------------------------------------------

def norm_seen_by_the_optimizer(trainer) -> list[float]:
    """The total norm of the gradients the update uses, read just before each optimizer step."""
    seen: list[float] = []

    def record(optimizer, *_):
        grads = [p.grad.double() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(math.sqrt(sum(float((g * g).sum()) for g in grads)))

    trainer.optimizer.register_step_pre_hook(record)
    return seen


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: unscaled before clipping
def test_clipping_scales_the_update_to_max_grad_norm_and_0_turns_it_off(tmp_path, init_folder, corpus, precision):
    results, seen = {}, {}
    for max_norm in (0.05, 1e4, 0.0):
        trainer = build_trainer(config_for(init_folder, corpus, tmp_path / f"run-{max_norm}", precision=precision,
                                           max_grad_norm=max_norm))
        seen[max_norm] = norm_seen_by_the_optimizer(trainer)
        results[max_norm] = first_step(trainer)
        assert results[max_norm].applied and len(seen[max_norm]) == 1
    # Same seed, same first step: the pre-clip norm the step reports does not depend on the limit.
    norm = results[0.0].grad_norm
    assert {r.grad_norm for r in results.values()} == {norm}
    assert 10 * 0.05 < norm < 1e4 / 10  # well above 0.05 (clipped there), well below 1e4 (not clipped)
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6) and the two norms sum in different orders:
    # relative differences of 1e-6 / norm and fp32 rounding, both below 1e-5.
    assert seen[0.05][0] == pytest.approx(0.05, rel=1e-5)
    assert seen[1e4][0] == pytest.approx(norm, rel=1e-5)
    assert seen[0.0][0] == pytest.approx(norm, rel=1e-5)


def test_clipping_off_lets_a_large_gradient_through(tmp_path, init_folder, corpus):
    seen, results = {}, {}
    for max_norm in (0.0, 1.0):
        trainer = build_trainer(config_for(init_folder, corpus, tmp_path / f"run-{max_norm}", max_grad_norm=max_norm))
        forward = trainer.forward
        trainer.forward = lambda *args, forward=forward, **kwargs: forward(*args, **kwargs) * 1000.0
        seen[max_norm] = norm_seen_by_the_optimizer(trainer)
        results[max_norm] = first_step(trainer)
    large = results[0.0].grad_norm
    assert large > 500 and results[1.0].grad_norm == large
    assert seen[0.0] == [pytest.approx(large, rel=1e-5)]
    assert seen[1.0] == [pytest.approx(1.0, rel=1e-5)]  # the default would have clipped it


# --- held-out sets ---------------------------------------------------------------------------------

def test_eval_data_trains_on_every_story_and_evaluates_on_the_given_file(tmp_path, init_folder, corpus, tokenizer):
    held_out = SAMPLE_TEXTS[:6]
    eval_file = tmp_path / "held-out.jsonl"
    eval_file.write_text("".join(json.dumps({"text": story}) + "\n" for story in held_out), encoding="utf-8")
    out = tmp_path / "run"
    trainer = build_trainer(config_for(init_folder, corpus, out, eval_data=str(eval_file), epochs=1, max_steps=5))
    stories = data.read_stories(corpus)
    assert (trainer.dataset.train_story_count, trainer.dataset.eval_story_count) == (len(stories), 6)
    # No split: the training blocks are all of --data, in file order; the eval blocks are the file's stories.
    expected_train = data.pack_blocks(data.tokenize_stories(stories, tokenizer, use_cache=False), 64, tokenizer.eos_id)
    expected_eval = data.pack_blocks(data.tokenize_stories(held_out, tokenizer, use_cache=False), 64,
                                     tokenizer.eos_id)
    assert torch.equal(trainer.dataset.train.inputs, expected_train.inputs)
    assert torch.equal(trainer.dataset.eval.inputs, expected_eval.inputs)
    assert torch.equal(trainer.dataset.eval.targets, expected_eval.targets)
    # The default split would have held some stories out of training.
    split_train, _ = data.split_stories(stories, 0.1, 3)
    assert len(split_train) < len(stories)

    evaluated = evaluate(trainer)
    assert evaluated is not None and math.isfinite(evaluated)
    run_epochs(trainer)
    assert f"{len(stories)} training stories" in (out / "final" / "README.md").read_text()
    assert "6 held out" in (out / "final" / "README.md").read_text()

    # The held-out stories are part of what a resume checks: with other ones its eval losses would not compare.
    eval_file.write_text("".join(json.dumps({"text": story}) + "\n" for story in SAMPLE_TEXTS[1:7]), encoding="utf-8")
    with pytest.raises(UserError, match=r"the stories of the run in .* changed since it started"):
        build_trainer(config_for(init_folder, corpus, out, eval_data=str(eval_file), max_steps=6, resume=True))


def test_eval_split_0_holds_nothing_out(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, eval_split=0.0, epochs=1))
    assert progress.finished and len(progress.history) == 1
    assert progress.history[0]["eval_loss"] is None and progress.history[0]["perplexity"] is None
    card = (out / "final" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| 1 |"))
    assert re.fullmatch(r"\| 1 \| \d+ \| \d+\.\d{4} \| - \| - \|", row), row
    assert f"{len(data.read_stories(corpus))} training stories" in card and "0 held out" in card
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "best").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out)).Reload().Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" not in tags


# --- defaults against the README -------------------------------------------------------------------

# What the README's words for a default mean in the parsed flags.
PROSE_DEFAULTS = {
    "the bundled stories": None, "the init checkpoint's": None, "`runs/<date-time>`": None,
    "min(1024, model context)": None, "none": None, "each epoch": None, "off": False, "the checkpoint's": None,
    "the newest export under `runs/`, else `bookbot/gpt2-indo-small-kids-stories`": None,
}


def readme_table(heading: str) -> dict[str, str]:
    """{'--flag': default cell} from the first flag table after `heading`."""
    section = README[README.index(heading):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"^\| `(--[a-z0-9-]+)[^`]*` \| ([^|]*) \|", section, flags=re.MULTILINE)
    assert rows, f"no flag table under {heading!r}"
    return {flag: cell.strip() for flag, cell in rows}


def parsed_defaults(parser, args) -> dict[str, object]:
    namespace = vars(parser.parse_args(args))
    return {action.option_strings[-1]: namespace[action.dest] for action in parser._actions
            if action.option_strings and action.dest != "help"}


def readme_value(cell: str) -> object:
    if cell in PROSE_DEFAULTS:
        return PROSE_DEFAULTS[cell]
    if re.fullmatch(r"`[^`]+`", cell):
        return cell.strip("`")
    try:
        return float(cell)
    except ValueError:
        raise AssertionError(f"README default {cell!r} is neither a number, a `value` nor known prose") from None


@pytest.mark.parametrize("which", ["train", "generate"])
def test_readme_flag_tables_match_the_parsers(which):
    if which == "train":
        table = readme_table("## Training: `python train.py`")
        defaults = parsed_defaults(build_train_parser(), [])
    else:
        table = readme_table("## Generating stories: `python generate.py`")
        defaults = parsed_defaults(build_generate_parser(), ["x"])
    assert set(table) == set(defaults), "the README's flag table and the parser list different flags"
    for flag, cell in table.items():
        expected, got = readme_value(cell), defaults[flag]
        if isinstance(expected, float):
            assert isinstance(got, (int, float)) and not isinstance(got, bool) and got == expected, (flag, cell, got)
        else:
            assert got == expected and type(got) is type(expected), (flag, cell, got)


def test_the_published_recipe_is_what_no_flags_give():
    """README: 10 epochs, 10% held out, AdamW (lr 5e-5, betas 0.9/0.999, eps 1e-8, no weight decay), linear
    decay to 0 without warm-up, clipping at 1.0, micro-batch 8, block size 1024, seed 42."""
    prose = " ".join(README[README.index("With no flags it is the published model's recipe"):].split("|")[0].split())
    numbers = re.search(r"(\d+) epochs, (\d+)% of the stories held out, AdamW \(lr (\S+), betas (\S+)/(\S+), "
                        r"eps (\S+), no weight decay\), linear decay to 0 without warm-up, clipping at (\S+), "
                        r"micro-batch (\d+), block size (\d+), seed (\d+)", prose)
    assert numbers, prose
    epochs, held_out, lr, beta1, beta2, eps, clip, batch, block, seed = numbers.groups()
    config = parse_train_args([])
    assert (config.epochs, config.eval_split, config.eval_data) == (int(epochs), int(held_out) / 100, None)
    assert (config.max_grad_norm, config.batch_size, config.grad_accum, config.seed) == (
        float(clip), int(batch), 1, int(seed))
    assert config.init == "flax-community/gpt2-small-indonesian" and config.eval_every is None

    optimizer = make_optimizer(tiny_model(), config.lr, config.weight_decay, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
            float(lr), (float(beta1), float(beta2)), float(eps), 0.0)
    schedule = lr_lambda(config.schedule, config.warmup_steps, 10)
    assert [schedule(step) for step in range(11)] == [(10 - step) / 10 for step in range(11)]
    assert int(block) == 1024 and config.block_size is None  # resolved against the model's context, below


def test_default_block_size_is_1024_capped_by_the_context(tmp_path, corpus, tokenizer):
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    for context, expected in ((2048, 1024), (128, 128)):
        folder = tmp_path / f"init-{context}"
        torch.manual_seed(0)
        GPT2LMHeadModel(HFConfig(vocab_size=tokenizer.vocab_size, n_positions=context, n_embd=16, n_layer=1,
                                 n_head=2)).save_pretrained(folder)
        tokenizer.save(folder)
        trainer = build_trainer(config_for(folder, corpus, tmp_path / f"run-{context}", block_size=None))
        assert trainer.dataset.train.inputs.shape[1] == expected


# --- fp16: giving up after 25 skipped steps in a row ----------------------------------------------

def fp16_trainer(tmp_path, init_folder, corpus, bad_steps: set[int], **overrides):
    """An fp16 run whose loss is infinite (so are its gradients) at the given 1-based steps."""
    trainer = build_trainer(config_for(init_folder, corpus, tmp_path / "run", precision="fp16", **overrides))
    forward, taken = trainer.forward, []

    def maybe_infinite(*args, **kwargs):
        step = trainer.progress.step + 1
        if not taken or taken[-1] != step:
            taken.append(step)
        loss = forward(*args, **kwargs)
        return loss * float("inf") if step in bad_steps else loss

    trainer.forward = maybe_infinite
    return trainer, taken


def test_fp16_stops_at_exactly_the_25th_skipped_step_in_a_row(tmp_path, init_folder, corpus):
    assert MAX_SKIPPED_STEPS == 25  # the README's figure
    trainer, taken = fp16_trainer(tmp_path, init_folder, corpus, bad_steps=set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match=r"non-finite at step 25 ") as error:
        run_epochs(trainer)
    assert taken == list(range(1, 26)), "the run did not stop right after the 25th skipped step"
    assert trainer.progress.step == 25 and trainer.progress.skipped_in_a_row == 25
    assert str(error.value).endswith("the run stopped: no checkpoint was saved yet; lower --lr or use --precision fp32")


@pytest.mark.parametrize("bad", [1, 24])
def test_fp16_fewer_skipped_steps_in_a_row_do_not_stop_the_run(tmp_path, init_folder, corpus, bad):
    stop = bad + 3
    trainer, taken = fp16_trainer(tmp_path, init_folder, corpus, bad_steps=set(range(1, bad + 1)), max_steps=stop)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    progress = run_epochs(trainer)
    assert progress.step == stop and taken == list(range(1, stop + 1))
    assert progress.skipped_in_a_row == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    # Skipped steps do not advance the schedule: the rate after the run is that of the applied steps.
    applied = stop - bad
    assert trainer.scheduler.last_epoch == applied

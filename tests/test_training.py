"""The training loop, in process and through `python train.py`, on tiny models (CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, config_for, final_weights, run_train
from safetensors.torch import load_file

from gpt2kids import data, training
from gpt2kids.hf import load_model
from gpt2kids.model import IGNORE_INDEX
from gpt2kids.training import TrainingDiverged, optimizer_step, prepare_run, run_epochs, train

EVENT_TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/perplexity"}


def eval_loss_of(model_folder: Path, corpus: Path, tokenizer) -> float:
    model, _ = load_model(model_folder)
    model.eval()
    _, held_out = data.load_split(corpus, None, 0.1, seed=3)
    blocks = data.pack_blocks(data.tokenize_stories(held_out, tokenizer), 64, tokenizer.eos_id)
    with torch.no_grad():
        return float(model(blocks.inputs, blocks.targets, reduction="sum") / blocks.token_count)


def hparams_logged(run_dir: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for events_file in run_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events_file)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    return True
    return False


# --- the end-to-end demo -------------------------------------------------------------------------

def test_scratch_tiny_demo_on_the_bundled_stories(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import pipeline

    out = tmp_path / "run"
    result = run_train("--init", "scratch", "--model-size", "tiny", "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1: train loss" in result.stderr and "eval loss" in result.stderr
    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert EVENT_TAGS <= set(events.Tags()["scalars"])
    assert "sample/text_summary" in events.Tags()["tensors"]
    assert hparams_logged(out)
    for folder in ("checkpoint", "best", "final"):
        assert (out / folder).is_dir(), folder
    card = (out / "final" / "README.md").read_text()
    assert "| epoch | step | training loss | validation loss | perplexity |" in card
    assert "| 1 |" in card and "scratch (tiny)" in card
    # The trained export gives transformers the logits gpt2kids computes.
    from transformers import GPT2LMHeadModel

    ids = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(out / "final").eval()(ids).logits
        ours = load_model(out / "final")[0].eval()(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # fp32, sums in another order
    generator = pipeline("text-generation", model=str(out / "final"), tokenizer=str(out / "final"))
    text = generator("Pada suatu hari", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("Pada suatu hari") and len(text) > len("Pada suatu hari")


# --- the loop's promises -------------------------------------------------------------------------

def test_fine_tuning_from_an_hf_folder_lowers_eval_loss(tmp_path, init_folder, corpus, tokenizer):
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=3))
    assert progress.finished and len(progress.history) == 3
    before = eval_loss_of(init_folder, corpus, tokenizer)
    after = eval_loss_of(out / "best", corpus, tokenizer)
    assert after < before - 0.5, (before, after)
    assert progress.best_eval_loss == pytest.approx(after, rel=1e-4)
    losses = [row["eval_loss"] for row in progress.history]
    assert losses[-1] < losses[0]
    assert progress.history[0]["perplexity"] == pytest.approx(math.exp(losses[0]))


def micro_batches_of_unequal_token_counts(run) -> list[torch.Tensor]:
    """Six blocks, the partial last block among them, split 3 + 1 + 2: unequal token counts."""
    counts = (run.dataset.train.targets != IGNORE_INDEX).sum(dim=1)
    partial = int(counts.argmin())
    assert counts[partial] < counts.max()  # the corpus ends in a partial block
    others = [i for i in range(len(counts)) if i != partial][:5]
    return [torch.tensor(others[:3]), torch.tensor([partial]), torch.tensor(others[3:])]


def step_gradients(run, micro_batches) -> tuple[float, torch.Tensor]:
    """The step's mean loss and its gradient (all parameters, one vector), as the optimizer would get it."""
    run.optimizer.zero_grad(set_to_none=True)
    loss, _ = training.backward(run, micro_batches)
    gradient = torch.cat([p.grad.flatten() for p in run.model.parameters()])
    run.optimizer.zero_grad(set_to_none=True)
    return loss, gradient


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# fp32: the same sums in another order; relative rounding ~1e-7 per operation, a few hundred deep.
FP32_BOUND = 1e-5


def test_grad_accumulation_gives_the_gradient_of_one_batch(tmp_path, init_folder, corpus):
    run = prepare_run(config_for(init_folder, corpus, tmp_path / "run", batch_size=8, dropout=0.0))
    micro_batches = micro_batches_of_unequal_token_counts(run)
    whole_loss, whole = step_gradients(run, [torch.cat(micro_batches)])
    accumulated_loss, accumulated = step_gradients(run, micro_batches)
    assert abs(accumulated_loss - whole_loss) / whole_loss < FP32_BOUND
    assert relative_difference(accumulated, whole) < FP32_BOUND

    # The bound catches the bugs accumulation can have. A micro-batch dropped:
    _, dropped = step_gradients(run, micro_batches[:-1])
    assert relative_difference(dropped, whole) > 100 * FP32_BOUND
    # Each micro-batch normalised by its own token count (AdamW would not notice a uniform scale,
    # but these counts are unequal, so the direction changes too):
    per_micro_batch = sum(step_gradients(run, [m])[1] for m in micro_batches)
    assert relative_difference(per_micro_batch / len(micro_batches), whole) > 100 * FP32_BOUND


def logged(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def same_steps(a: Path, b: Path) -> bool:
    """Per step, the mean loss and the pre-clipping gradient norm agree within fp32 rounding."""
    for tag in ("train/loss", "train/grad_norm"):
        first, second = logged(a, tag), logged(b, tag)
        assert first.keys() == second.keys() and first
        if any(abs(second[step] - value) > FP32_BOUND * abs(value) for step, value in first.items()):
            return False
    return True


def test_ddp_on_two_cpu_processes_gives_the_steps_and_weights_of_one_process(tmp_path, init_folder, corpus):
    common = ["--data", str(corpus), "--init", str(init_folder), "--epochs", "1", "--block-size", "64",
              "--lr", "1e-3", "--precision", "fp32", "--device", "cpu", "--dropout", "0", "--max-steps", "3"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # the same kernels on both sides
    single = run_train(*common, "--batch-size", "4", "--out", str(tmp_path / "single"), env=one_thread)
    assert single.returncode == 0, single.stderr

    def ddp(out: Path, *script: str) -> None:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", **one_thread}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 *script, *common, "--batch-size", "2", "--out", str(out)],
                                cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr

    ddp(tmp_path / "ddp", "train.py")
    assert same_steps(tmp_path / "single", tmp_path / "ddp")
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert "GPUs/processes | 2" in (tmp_path / "ddp" / "final" / "README.md").read_text()
    # The bound catches a normaliser that forgets DDP's averaging (gradients half as large).
    ddp(tmp_path / "broken", "tests/variants.py", "normaliser-without-world-size", "--")
    assert not same_steps(tmp_path / "single", tmp_path / "broken")


def test_ddp_stop_and_resume_with_dropout_ends_with_the_same_weights(tmp_path, init_folder, corpus):
    # 93 training blocks of 128, 4 per process: each epoch's last micro-batch gives process 0 four blocks and
    # process 1 one, so their dropout draws part ways there. The run stops at the end of epoch 1 (step 12):
    # resuming must give each process its own RNG state back.
    common = ["--data", str(corpus), "--init", str(init_folder), "--epochs", "2", "--block-size", "128",
              "--batch-size", "4", "--lr", "1e-3", "--precision", "fp32", "--device", "cpu", "--dropout", "0.1",
              "--seed", "3"]

    def ddp(out: Path, *extra: str) -> str:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "train.py", *common, "--out", str(out), *extra],
                                cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "93 training blocks of 128 tokens, 12 steps per epoch" in ddp(tmp_path / "straight")
    ddp(tmp_path / "stopped", "--max-steps", "12")
    ddp(tmp_path / "stopped", "--resume")
    straight, continued = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    for key in straight:
        assert torch.equal(straight[key], continued[key]), key


def test_a_run_resumes_only_with_the_process_count_it_was_trained_with(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    common = ["--data", str(corpus), "--init", str(init_folder), "--block-size", "64", "--device", "cpu",
              "--precision", "fp32", "--out", str(out)]
    assert run_train(*common, "--max-steps", "2").returncode == 0
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train.py", "--out", str(out), "--resume"],
                             cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode != 0
    # Said once, by rank 0: the other process reads the same checkpoint and stays quiet.
    assert resumed.stderr.count("was trained by 1 process(es) and this is 2; resume it with the same count") == 1


def test_a_run_inside_its_data_folder_resumes_and_trains_on_the_stories_only(tmp_path, init_folder, corpus):
    import shutil

    stories = tmp_path / "stories"
    shutil.copytree(corpus, stories)
    out = stories / "run"  # its exports hold .txt files (merges.txt) that are no stories
    first = prepare_run(config_for(init_folder, stories, out, max_steps=2))
    run_epochs(first)
    assert (out / "final" / "merges.txt").is_file()
    resumed = prepare_run(config_for(init_folder, stories, out, max_steps=3, resume=True))
    assert resumed.dataset.digest == first.dataset.digest and resumed.progress.step == 2


def test_a_run_started_with_relative_paths_resumes_from_another_folder(tmp_path, init_folder, corpus):
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(corpus, work / "stories")
    shutil.copytree(init_folder, work / "models" / "init")  # "models/init" looks like a hub id
    elsewhere.mkdir()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def train_py(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "train.py"), *flags], cwd=cwd, env=environment,
                              capture_output=True, text=True, timeout=300)

    first = train_py(work, "--data", "stories", "--init", "models/init", "--block-size", "64", "--device", "cpu",
                     "--precision", "fp32", "--max-steps", "2", "--out", "runs/r")
    assert first.returncode == 0, first.stderr
    resumed = train_py(elsewhere, "--out", str(work / "runs" / "r"), "--resume", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    card = (work / "runs" / "r" / "final" / "README.md").read_text()
    assert "base_model:" not in card  # a local folder, not the hub's models/init


def test_stop_and_resume_ends_with_the_same_weights(tmp_path, init_folder, corpus):
    # Dropout on and bf16 autocast: the RNG state and the data position both have to be restored.
    settings = dict(dropout=0.1, precision="bf16", eval_every=5)
    train(config_for(init_folder, corpus, tmp_path / "straight", **settings))
    stopped = train(config_for(init_folder, corpus, tmp_path / "stopped", max_steps=7, **settings))
    assert stopped.step == 7 and not stopped.finished
    resumed = train(config_for(init_folder, corpus, tmp_path / "stopped", resume=True, lr=123.0))  # lr ignored
    assert resumed.finished
    straight, continued = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    for key in straight:
        assert torch.equal(straight[key], continued[key]), key
    assert load_file(tmp_path / "straight" / "final" / "model.safetensors").keys() == \
        load_file(tmp_path / "stopped" / "final" / "model.safetensors").keys()


def test_a_run_ends_with_final_then_one_checkpoint_that_records_it_finished(tmp_path, init_folder, corpus,
                                                                          monkeypatch):
    events = []
    real_save, real_export = training.checkpoint.save, training.export

    def save(folder, model, state):
        events.append(("checkpoint", state["progress"]["epoch"], state["progress"]["finished"]))
        real_save(folder, model, state)

    def export(model, tokenizer, folder, **options):
        if Path(folder).name == "final":
            events.append(("final",))
        real_export(model, tokenizer, folder, **options)

    monkeypatch.setattr(training.checkpoint, "save", save)
    monkeypatch.setattr(training, "export", export)
    assert train(config_for(init_folder, corpus, tmp_path / "run", epochs=2)).finished
    # Not a second checkpoint of the last epoch (another full write of weights and optimizer state).
    assert events == [("checkpoint", 1, False), ("final",), ("checkpoint", 2, True)]


def test_the_evaluation_sample_leaves_the_training_rng_alone(tmp_path, init_folder, corpus):
    """Dropout draws from the global generator: a sample drawn from it would move every later step's masks."""
    run = prepare_run(config_for(init_folder, corpus, tmp_path / "run"))
    state = torch.get_rng_state()
    story = training.sample_story(run)
    assert torch.equal(torch.get_rng_state(), state)
    assert story.startswith(training.SAMPLE_PROMPT) and len(story) > len(training.SAMPLE_PROMPT)
    torch.manual_seed(1)  # another global state: the same story (its own generator, seeded by --seed)
    assert training.sample_story(run) == story


def test_a_stop_signal_in_the_last_step_lets_the_run_end(tmp_path, init_folder, corpus, monkeypatch):
    real_step = training.optimizer_step

    def last_step_signalled(run, micro_batches):
        if run.progress.step + 1 == run.total_steps:
            run.stop_signal = signal.SIGINT
        return real_step(run, micro_batches)

    monkeypatch.setattr(training, "optimizer_step", last_step_signalled)
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=2))  # no Stopped: nothing is left to resume
    assert progress.finished and (out / "final").is_dir()


def test_the_last_lines_say_where_the_time_went(tmp_path, init_folder, corpus, monkeypatch, capfd):
    real_save = training.checkpoint.save

    def slow_save(*args):
        time.sleep(0.5)
        real_save(*args)

    monkeypatch.setattr(training.checkpoint, "save", slow_save)
    train(config_for(init_folder, corpus, tmp_path / "run", epochs=2))
    line = re.search(r"time: the loop took ([\d.]+) s: ([\d.]+) s in optimizer steps, ([\d.]+) s evaluating, "
                     r"([\d.]+) s writing checkpoints and exports", capfd.readouterr().err)
    total, steps, evaluating, saving = map(float, line.groups())
    assert saving >= 1.0  # two checkpoints, each at least half a second
    assert steps > 0 and evaluating > 0
    assert steps + evaluating + saving <= total + 0.15  # each figure is rounded to 0.1 s


def test_bf16_autocast_on_cpu_trains(tmp_path, init_folder, corpus):
    progress = train(config_for(init_folder, corpus, tmp_path / "run", precision="bf16", epochs=2))
    assert progress.history[-1]["train_loss"] < progress.history[0]["train_loss"]
    assert progress.history[-1]["eval_loss"] < progress.history[0]["eval_loss"]


def test_compiled_training_gives_the_steps_of_eager_and_resumes_exactly(tmp_path, init_folder, corpus):
    """--compile (torch.compile, inductor on CPU) compiles, trains the same steps, keeps clean names."""
    import torch._dynamo

    settings = dict(max_steps=3, dropout=0.0, eval_every=3)
    train(config_for(init_folder, corpus, tmp_path / "eager", **settings))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with training.compiler_switches_kept():  # what train() does around the two
        run = prepare_run(config_for(init_folder, corpus, tmp_path / "compiled", compile=True, **settings))
        run_epochs(run)
    assert run.model._compiled_call_impl is not None  # the flag was not ignored
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert same_steps(tmp_path / "eager", tmp_path / "compiled")
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert a.keys() == b.keys()  # no compiler prefixes in checkpoint names
    initial = {key: value.clone() for key, value in load_model(init_folder)[0].untied_state_dict().items()}

    # Dropout on: a compiled run stopped and resumed (each in a fresh compiler state, as in a new
    # process) retraces the run never stopped, bit for bit (dropout draws from the checkpointed
    # generator; deterministic algorithms order the embedding's gradient sum).
    dropout = dict(compile=True, dropout=0.1, eval_every=3)
    for name, runs in (("straight", [dict(max_steps=4)]),
                       ("stopped", [dict(max_steps=2), dict(max_steps=4, resume=True)])):
        for extra in runs:
            torch._dynamo.reset()
            train(config_for(init_folder, corpus, tmp_path / name, **dropout, **extra))
            # The process-wide switches the compiled run turned on are off again once it has ended.
            assert not torch.are_deterministic_algorithms_enabled()
            assert not torch._inductor.config.fallback_random
            assert torch.utils.deterministic.fill_uninitialized_memory
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert any(not torch.equal(straight[key], initial[key]) for key in initial)  # it trained
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_fp16_with_grad_scaler_trains_and_saves_the_scaler(tmp_path, init_folder, corpus):
    progress = train(config_for(init_folder, corpus, tmp_path / "run", precision="fp16", max_steps=4))
    assert progress.step == 4
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]


@pytest.mark.parametrize("spoil", ["overflow", "nan-loss"])
def test_fp16_skips_a_non_finite_step_whole_and_trains_on(tmp_path, init_folder, corpus, spoil):
    """The weights, the optimizer and the learning-rate schedule stay as they were; the next step applies."""
    run = prepare_run(config_for(init_folder, corpus, tmp_path / "run", precision="fp16"))
    forward, scale = run.forward, run.scaler.get_scale()
    if spoil == "overflow":  # the loss and its gradients overflow: the scaler lowers its scale
        run.forward = lambda *args, **kwargs: forward(*args, **kwargs) * float("inf")
    else:  # the loss becomes NaN, its gradients do not (a constant NaN has no gradient)
        run.forward = lambda *args, **kwargs: forward(*args, **kwargs) + torch.tensor(float("nan"))
    order = data.epoch_order(len(run.dataset.train), 3, 0)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    result = optimizer_step(run, run.plan.step_blocks(order, 0))
    assert not result.applied and math.isfinite(result.grad_norm) == (spoil == "nan-loss")
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    assert run.scheduler.last_epoch == 0 and not run.optimizer.state
    if spoil == "overflow":
        assert run.scaler.get_scale() < scale
    run.forward = forward
    assert optimizer_step(run, run.plan.step_blocks(order, 1)).applied
    assert run.scheduler.last_epoch == 1
    assert all(int(state["step"]) == 1 for state in run.optimizer.state.values())


def test_an_epochs_train_loss_is_the_token_weighted_mean_of_its_own_applied_steps(tmp_path, init_folder, corpus,
                                                                                   monkeypatch):
    """Each epoch starts its sum afresh, and an fp16 step skipped for a non-finite loss counts for nothing."""
    real_step, steps = training.optimizer_step, []

    def recorded(run, micro_batches):
        forward = run.forward
        if (run.progress.epoch, run.progress.step_in_epoch) == (1, 1):  # epoch 2's second step overflows
            run.forward = lambda *args, **kwargs: forward(*args, **kwargs) * float("inf")
        try:
            result = real_step(run, micro_batches)
        finally:
            run.forward = forward
        steps.append((run.progress.epoch, result))
        return result

    monkeypatch.setattr(training, "optimizer_step", recorded)
    progress = train(config_for(init_folder, corpus, tmp_path / "run", precision="fp16", batch_size=8))
    assert progress.finished and len(progress.history) == 2
    assert not [result for epoch, result in steps if epoch == 1][1].applied
    for epoch, row in enumerate(progress.history):
        applied = [result for at, result in steps if at == epoch and result.applied]
        expected = sum(r.loss * r.target_tokens for r in applied) / sum(r.target_tokens for r in applied)
        assert math.isfinite(row["train_loss"]) and row["train_loss"] == pytest.approx(expected, rel=1e-9), epoch


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, max_steps=3, save_every=3))
    kept, kept_export = final_weights(out), (out / "final" / "model.safetensors").read_bytes()
    # Force divergence: resume the run with an absurd learning rate.
    run = prepare_run(config_for(init_folder, corpus, out, resume=True))
    for group in run.optimizer.param_groups:
        group["lr"] = 1e30
    run.scheduler.base_lrs = [1e30] * len(run.optimizer.param_groups)
    # Step 4 applies the absurd update; step 5's loss is the first non-finite one, and fp32 gives up at once.
    with pytest.raises(TrainingDiverged, match=r"non-finite at step 5 ") as error:
        run_epochs(run)
    assert run.progress.step == 5 and run.progress.skipped_in_a_row == 1
    # The run is in fp32 and has a checkpoint and a final/ export: the message says so, and no more.
    assert str(error.value).endswith(f"the run stopped: {out / 'checkpoint'}/ holds the last good state, and "
                                     f"{out / 'final'}/ is as it was; lower --lr")
    assert all(torch.equal(kept[k], v) for k, v in final_weights(out).items())
    assert (out / "final" / "model.safetensors").read_bytes() == kept_export
    from test_reporting import session_end_statuses

    assert session_end_statuses(out) == ["STATUS_FAILURE"]  # TensorBoard's HParams tab: failed, not a success


def epoch_rows(card: str) -> list[str]:
    """The rows of the card's per-epoch table."""
    table = card[card.index("| epoch | step | training loss"):].split("\n\n")[0]
    return table.splitlines()[2:]


def test_early_stopping_stops_after_n_evaluations_without_a_new_best(tmp_path, init_folder, corpus, monkeypatch):
    losses = iter([3.0, 2.5, 2.6, 2.7, 2.4, 2.3])  # epochs 3 and 4 bring no new lowest loss
    monkeypatch.setattr(training, "evaluate", lambda run: next(losses))
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=6, early_stopping=2))
    assert progress.epoch == 4 and progress.finished
    assert progress.stopped_early.startswith("2 evaluations in a row brought no eval loss below 2.5000")
    assert [row["eval_loss"] for row in progress.history] == [3.0, 2.5, 2.6, 2.7]
    assert "stopped early" in (out / "final" / "README.md").read_text()
    best = (out / "best" / "README.md").read_text()
    assert "epoch 2, step" in best and len(epoch_rows(best)) == 2  # best/ is epoch 2's, with the rows up to it
    assert f"The run stopped early: {progress.stopped_early}." in best  # said when the run ended, after best/


def test_a_non_finite_eval_loss_is_never_the_best(tmp_path, init_folder, corpus, monkeypatch):
    losses = iter([float("nan"), 5.0, float("inf"), 4.0])
    monkeypatch.setattr(training, "evaluate", lambda run: next(losses))
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=4, early_stopping=2))
    assert progress.finished and progress.stopped_early is None  # 5.0 and 4.0 were each a new best
    assert progress.best_eval_loss == 4.0
    best = (out / "best" / "README.md").read_text()
    assert "epoch 4, step" in best and len(epoch_rows(best)) == 4


def test_early_stopping_after_evaluations_that_were_never_finite(tmp_path, init_folder, corpus, monkeypatch):
    monkeypatch.setattr(training, "evaluate", lambda run: float("nan"))
    progress = train(config_for(init_folder, corpus, tmp_path / "run", epochs=3, early_stopping=1))
    assert progress.finished and progress.best_eval_loss is None
    assert progress.stopped_early == "1 evaluation in a row brought no finite eval loss (--early-stopping 1)"


def test_early_stopping_counts_the_evaluations_within_an_epoch(tmp_path, init_folder, corpus, monkeypatch):
    losses = iter([3.0, 3.1, 3.2] + [4.0] * 100)  # the evaluations at steps 4 and 6 bring no new lowest loss
    monkeypatch.setattr(training, "evaluate", lambda run: next(losses))
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=2, eval_every=2, early_stopping=2))
    assert progress.step == 6 and progress.finished  # not at the end of the epoch (23 steps)
    assert progress.stopped_early.startswith("2 evaluations in a row brought no eval loss below 3.0000")
    assert "stopped early" in (out / "final" / "README.md").read_text()
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 6
    # final/ holds step 6's weights, evaluated at step 6 within the epoch: its card reports that loss.
    from huggingface_hub import ModelCard

    [loss] = [r.metric_value for r in ModelCard.load(out / "final" / "README.md").data.eval_results
              if r.metric_type == "loss"]
    assert loss == 3.2


def test_resuming_at_max_steps_trains_nothing_and_writes_nothing(tmp_path, init_folder, corpus, capsys):
    out = tmp_path / "run"
    assert train(config_for(init_folder, corpus, out, max_steps=4)).step == 4
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert train(config_for(init_folder, corpus, out, resume=True, max_steps=4)).step == 4
    assert "at or past --max-steps 4: nothing to train" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_a_resumed_scratch_run_names_its_start_as_a_run_never_stopped_does(tmp_path, corpus):
    from gpt2kids.train_config import TrainConfig

    settings = dict(init="scratch", model_size="tiny", data=str(corpus), out=str(tmp_path / "run"), batch_size=2,
                    block_size=32, device="cpu", precision="fp32", vocab_size=300)
    train(TrainConfig(**settings, max_steps=1))
    train(TrainConfig(**settings, max_steps=2, resume=True))
    assert "trained from scratch (tiny)" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_best_card_holds_the_row_of_its_own_epoch(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=2))
    best_epoch = min(progress.history, key=lambda row: row["eval_loss"])["epoch"]
    assert len(epoch_rows((out / "best" / "README.md").read_text())) == best_epoch


def test_cuda_device_with_an_index_under_torchrun_is_refused():
    from gpt2kids.distributed import Distributed
    from gpt2kids.errors import UserError

    two_processes = Distributed(rank=1, local_rank=1, world_size=2)
    with pytest.raises(UserError, match="every process on the same GPU"):
        two_processes.device_name("cuda:1")
    assert two_processes.device_name("cpu") == "cpu"
    assert Distributed().device_name("cuda:1") == "cuda:1"  # one process: as given


def test_dropout_override_keeps_the_loaded_weights(init_folder):
    plain, _ = load_model(init_folder)
    dropped, _ = load_model(init_folder, dropout=0.25)
    assert (dropped.config.resid_pdrop, dropped.config.embd_pdrop, dropped.config.attn_pdrop) == (0.25,) * 3
    for key, value in plain.state_dict().items():
        assert torch.equal(value, dropped.state_dict()[key]), key


def test_only_the_main_process_says_it_trains_a_bpe(capsys, corpus, monkeypatch):
    from gpt2kids.train_config import TrainConfig

    config = TrainConfig(init="scratch", model_size="tiny", vocab_size=300)
    stories = data.read_stories(corpus)[:20]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # another process under torchrun
    training.build_model_and_tokenizer(config, stories)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    training.build_model_and_tokenizer(config, stories)
    assert "training a byte-level BPE of up to 300 tokens" in capsys.readouterr().err


def test_a_resume_on_changed_stories_is_refused(tmp_path, init_folder, corpus):
    import shutil

    from gpt2kids.errors import UserError

    stories = tmp_path / "stories"
    shutil.copytree(corpus, stories)
    out = tmp_path / "run"
    train(config_for(init_folder, stories, out, max_steps=2))
    (stories / "zz_new.txt").write_text("Judul baru\n\nSebuah cerita yang ditambahkan kemudian.")
    # One more story moves the seeded split: a held-out story would be trained on, and the blocks shift.
    with pytest.raises(UserError, match=r"the stories of the run in .* changed since it started"):
        train(config_for(init_folder, stories, out, max_steps=4, resume=True))
    (stories / "zz_new.txt").unlink()
    assert train(config_for(init_folder, stories, out, max_steps=4, resume=True)).step == 4


def test_the_card_states_the_optimizer_settings_the_run_uses(tmp_path, init_folder, corpus):
    run = prepare_run(config_for(init_folder, corpus, tmp_path / "run"))
    assert "| optimizer | AdamW (betas 0.9, 0.999, eps 1e-08) |" in training.card_files_for(run, "final")["README.md"]
    run.optimizer.defaults["eps"] = 1e-6  # read from the optimizer, not written out beside it
    assert "| optimizer | AdamW (betas 0.9, 0.999, eps 1e-06) |" in training.card_files_for(run, "final")["README.md"]


def test_a_signal_the_shell_ignores_stays_ignored_while_training():
    import signal
    from types import SimpleNamespace

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a background job started by a script
    try:
        with training.stop_on_signals(SimpleNamespace()):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # still stops after a step
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_signal_that_comes_while_the_first_is_announced_aborts(monkeypatch):
    """The stop is announced after the handler is handed back, so a second Ctrl-C typed while the first is
    announced cannot land in the first one's handler and be lost."""
    import signal
    from types import SimpleNamespace

    def announce(_message: str) -> None:  # the second signal arrives while the first is being announced
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(training, "say", announce)
    run = SimpleNamespace()
    with pytest.raises(KeyboardInterrupt), training.stop_on_signals(run):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the signals are handled here, between bytecodes
    assert run.stop_signal == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

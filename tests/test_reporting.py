"""What a run tells people: TensorBoard events that survive a kill, stderr lines, the progress bar."""

from __future__ import annotations

import re
import signal

from conftest import config_for, run_train
from test_checkpoint import flags, run_with_fault


def scalar_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars as TensorBoard's Python loader serves them (`tensorboard --load_fast=false`): it takes a
    run's first SessionLog START as its beginning and only a later one as a restart (the legacy
    EventAccumulator purges on any START, so it would not see a resume that fails to be one)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    return {tag: [(event.step, float(tensor_util.make_ndarray(event.tensor_proto))) for event in events.Tensors(tag)]
            for tag in events.Tags()["tensors"] if events.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


def test_a_killed_and_resumed_run_logs_every_step_once(tmp_path, init_folder, corpus):
    """Killed at step 15 (after the step-10 checkpoint), resumed: the events read back as TensorBoard reads
    them equal an unbroken run's, every step once (steps 11-15 are logged again, the killed ones dropped)."""
    unbroken = tmp_path / "unbroken"
    assert run_train(*flags(init_folder, corpus, unbroken, "--epochs", "1")).returncode == 0
    out = tmp_path / "run"
    killed = run_with_fault("step:15", flags(init_folder, corpus, out, "--epochs", "1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = scalar_events(unbroken), scalar_events(out)
    assert {"train/loss", "eval/loss"} <= set(expected)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/perplexity"):
        steps = [step for step, _ in got[tag]]
        assert steps == sorted(set(steps)), (tag, steps)  # each step once, in order
        assert got[tag] == expected[tag], tag  # the same values: resume is exact
    assert 10 in [step for step, _ in got["eval/loss"]]  # the checkpoint's own step kept its evaluation


def test_the_end_of_a_run_says_where_the_model_is_and_the_bar_is_not_redrawn(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    result = run_train(*flags(init_folder, corpus, out, "--epochs", "1", "--eval-every", "100"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert f"exports: {out / 'best'}/, {out / 'final'}/; the run folder holds" in result.stderr
    assert any(line.endswith("MB") or line.endswith("KB") for line in lines if "the run folder holds" in line)
    assert f"python generate.py --model {out / 'best'} " in result.stderr  # the export push would publish
    assert f"tensorboard --logdir {out}" in result.stderr
    # After the epoch's summary line nothing redraws the finished bar.
    summary = result.stderr.index("epoch 1/1: train loss")
    assert "it/s" not in result.stderr[summary:] and "epoch 1/1:  " not in result.stderr[summary:]


def test_a_max_steps_run_also_says_where_the_model_is(tmp_path, init_folder, corpus):
    out = tmp_path / "my run"  # the commands it prints quote a path with a space, so they paste as they are
    result = run_train(*flags(init_folder, corpus, out, "--max-steps", "2"))
    assert result.returncode == 0, result.stderr
    assert f"exports: {out / 'final'}/" in result.stderr
    assert f"python generate.py --model '{out / 'final'}' " in result.stderr  # no evaluation yet: no best/
    assert f"tensorboard --logdir '{out}'" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"stopped at --max-steps 2 \(step 2 of \d+\); continue with: python train.py --out "
                        rf"{re.escape(repr(str(out)))} --resume", last), last


def hparams_summaries(run_dir) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(value.tag == "_hparams_/session_start_info" for path in sorted(run_dir.glob("events.out.tfevents.*"))
               for event in EventFileLoader(str(path)).Load() for value in event.summary.value)


def test_hparams_are_logged_once_per_run_even_when_its_first_session_logged_nothing(tmp_path):
    """--resume of a run stopped before its Reporter started (its first session wrote no events) starts again
    from step 0 as a resumed run: its hyper-parameters went unlogged."""
    from gpt2kids.reporting import Reporter

    settings = {"lr": 5e-5, "epochs": 10}
    Reporter(tmp_path, True, 0, settings, resumed=True).close()  # no events before: the hparams now
    assert hparams_summaries(tmp_path) == 1
    Reporter(tmp_path, True, 0, settings, resumed=True).close()  # a second session: not again
    assert hparams_summaries(tmp_path) == 1


def session_end_statuses(run_dir) -> list[str]:
    """The statuses of the hparams plugin's session-end summaries in the run's events, in order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    return [Status.Name(HParamsPluginData.FromString(value.metadata.plugin_data.content).session_end_info.status)
            for path in sorted(run_dir.glob("events.out.tfevents.*")) for event in EventFileLoader(str(path)).Load()
            for value in event.summary.value if value.tag == "_hparams_/session_end_info"]


def test_the_hparams_tab_shows_a_run_as_a_success_only_when_it_has_finished(tmp_path, init_folder, corpus):
    from gpt2kids.reporting import Reporter
    from gpt2kids.training import train

    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, max_steps=2))
    assert session_end_statuses(out) == []  # stopped to be resumed: not a success yet
    assert train(config_for(init_folder, corpus, out, resume=True)).finished
    assert session_end_statuses(out) == ["STATUS_SUCCESS"]
    Reporter(tmp_path / "diverged", True, 0, {"lr": 1.0}).close("STATUS_FAILURE")  # what a diverged run closes with
    assert session_end_statuses(tmp_path / "diverged") == ["STATUS_FAILURE"]


"""What a training run records for people: TensorBoard events and a progress bar per epoch.

Only the main process (rank 0) reports; its lines on stderr go through `gpt2kids.errors.say`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Reporter:
    def __init__(self, folder: Path, is_main: bool, start_step: int, settings: dict[str, Any],
                 resumed: bool = False) -> None:
        """A `resumed` run (at `start_step`, 0 for a run killed before its first checkpoint) drops the events a
        killed run logged after it; a run with no events yet logs its `settings` (the hyper-parameters) as hparams."""
        self.is_main = is_main
        self.writer = None
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Every session starts with a SessionLog START (a new run's at step 0): TensorBoard's Python loader
        # takes the first START of a run as its beginning and only a later one as a restart that drops the
        # steps a killed session logged after its checkpoint.
        # hparams once per run: a resumed run's are in its earlier events, unless it stopped before logging any.
        logged_before = resumed and any(folder.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if resumed else 0)
        if not logged_before:
            values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in settings.items()}
            # The session's end (its status) is written when the run ends, not now: see `close`.
            experiment, session_start, _ = hparams(values, {"eval/loss": 0.0, "eval/perplexity": 0.0})
            for summary in (experiment, session_start):
                self.writer.file_writer.add_summary(summary)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def progress_bar(self, description: str, total: int, done: int) -> tqdm:
        return tqdm(total=total, initial=done, desc=description, file=sys.stderr, disable=not self.is_main,
                    dynamic_ncols=True, leave=False)

    def close(self, status: str | None = None) -> None:
        """Flush and close; `status` ("STATUS_SUCCESS" for a run that finished, "STATUS_FAILURE" for one that
        diverged) is the run's end in TensorBoard's HParams tab. A session that stops to be resumed writes none:
        the tab shows the run's status as unknown until a later session ends it."""
        if self.writer is not None:
            if status is not None:
                self.writer.file_writer.add_summary(session_end(status))
            self.writer.close()
            self.writer = None


def session_end(status: str) -> Any:
    """The hparams plugin's session-end summary with `status` (torch's `hparams` writes one, always a success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    content = HParamsPluginData(session_end_info=SessionEndInfo(status=Status.Value(status), end_time_secs=time.time()),
                                version=PLUGIN_DATA_VERSION)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                      content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)])

"""What the local runners (``direct``'s harness threads, ``multiprocess``'s forked workers) share.

Beam's SDK harness prints each failed bundle's traceback on stderr before it answers the runner
with it; the runner raises that error in the driver, where the command says it in one line. Ours
answers without the print, which would reach the user's terminal first. And Beam's FnApiRunner
warns that its in-memory mode runs one worker: its own, not a runner's environment's.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator

from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.worker import sdk_worker, statesampler


class QuietHarness(sdk_worker.SdkHarness):
    """Beam's SDK harness; a failed instruction is answered with its traceback, not also printed."""

    def _execute(self, task, request) -> None:
        with statesampler.instruction_id(request.instruction_id):
            try:
                response = task()
            except BaseException:  # noqa: BLE001 - as Beam's: every failure is answered, and the runner raises it
                response = beam_fn_api_pb2.InstructionResponse(
                    instruction_id=request.instruction_id, error=traceback.format_exc()
                )
            self._responses.put(response)


class _NoModeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("If direct_num_workers is not equal to 1")


@contextlib.contextmanager
def without_mode_warning() -> Iterator[None]:
    """The FnApiRunner's log without its warning that in-memory mode runs one worker."""
    runner_log = logging.getLogger(FnApiRunner.__module__)
    quiet = _NoModeWarning()
    runner_log.addFilter(quiet)
    try:
        yield
    finally:
        runner_log.removeFilter(quiet)

"""``--runner multiprocess``: Beam's in-process runner with worker processes forked from a warm one.

    querycache build ... --runner multiprocess -- --direct_num_workers=4

Beam's own ``multi_processing`` mode starts each worker as a new interpreter that imports Beam, then
the DoFns' modules, torch and transformers (~1 s + ~3.7 s a worker on 2 cores, on the critical path:
the model stack is imported when the head is planned, after the last line was read). Here a
``multiprocessing`` fork server imports them once, started by :func:`prestart` while the command
line imports the same in the driver (a core that is idle then), and each worker is a fork of it:
it starts in milliseconds with the model stack loaded. The workers are Beam's own SDK harness,
quiet about the failures it answers (:mod:`querycache.runners.harness`), connected to the runner
as Beam's subprocess workers are, with the driver's environment of the
moment; they log as the driver does (:mod:`querycache.runners.worker_setup`). A worker that ends
before its work does (the out-of-memory killer, or a failed start) fails the pipeline with
:class:`WorkerLost`, where Beam's runner would wait for its answer forever. As in any
``multiprocessing`` program, a script that runs this runner keeps its own work under
``if __name__ == "__main__":`` (workers import it).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

from apache_beam.portability.api import beam_provision_api_pb2, endpoints_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.portability.fn_api_runner.fn_runner import ExtendedProvisionInfo
from apache_beam.runners.portability.fn_api_runner.worker_handlers import GrpcWorkerHandler, WorkerHandler
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.transforms.environments import Environment, python_sdk_capabilities
from google.protobuf import json_format, text_format

from querycache.runners.harness import QuietHarness, without_mode_warning

URN = "querycache:env:forked_python:v1"
_ENDED_BADLY: list[tuple[str, int]] = []  # (worker id, exit status) of this driver's workers
PRELOAD = ["querycache.runners.worker_setup", __name__]  # worker_setup first: before Beam is imported


def _context(*modules: str) -> multiprocessing.context.BaseContext:
    """The fork server's context; ``modules`` are imported by the server if this call starts it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, *modules])
    return context


def prestart(pipeline: str) -> None:
    """Start the fork server now: it imports the ``pipeline`` module (and what its workers' code
    needs with it: torch and transformers for a build) while the caller goes on. Without it, the
    server starts with the first worker, and each worker imports what its stages need."""
    from multiprocessing import forkserver

    _context(pipeline)
    forkserver.ensure_running()


def _serve(environment: dict[str, str]) -> None:
    """A worker: Beam's SDK harness on the runner's control address, until the runner is done; as
    Beam's worker main builds it, but quiet about the failures it answers (runners/harness.py)."""
    from apache_beam.runners.worker import sdk_worker_main

    os.environ.update(environment)
    _, harness, _ = sdk_worker_main.create_harness(os.environ)  # no log service here: no log handler
    harness.__class__ = QuietHarness  # Beam builds the harness itself; this class only answers quietly
    harness.run()


@Environment.register_urn(URN, bytes)
class ForkedEnvironment(Environment):
    """Python workers forked from this machine's fork server."""

    def to_runner_api_parameter(self, context):
        return URN, b""

    @staticmethod
    def from_runner_api_parameter(payload, capabilities, artifacts, resource_hints, context):
        return ForkedEnvironment(capabilities, artifacts, resource_hints)


@WorkerHandler.register_environment(URN, bytes)
class ForkedWorkerHandler(GrpcWorkerHandler):
    """Starts one forked worker and waits for it to end when the runner closes its connection."""

    def __init__(self, payload, state, provision_info, grpc_server):
        super().__init__(state, provision_info, grpc_server)

    def start_worker(self) -> None:
        control = endpoints_pb2.ApiServiceDescriptor(url=self.control_address)
        environment = {  # the driver's now, as Beam gives its subprocess workers: the server's is older
            **os.environ,
            "CONTROL_API_SERVICE_DESCRIPTOR": text_format.MessageToString(control),
            "PIPELINE_OPTIONS": json_format.MessageToJson(self.provision_info.provision_info.pipeline_options),
            "WORKER_ID": self.worker_id,
        }
        self._process = _context().Process(target=_serve, args=(environment,), name=self.worker_id)
        self._process.start()
        self._watcher = threading.Thread(target=self._watch, name=f"{self.worker_id}-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Wait for the worker to end; if it ends badly, fail what the runner waits for from it: its
        answers and its data (Beam's runner watches the data channel, which a worker killed before
        it connected never closes: it would wait forever)."""
        self._process.join()
        if not self._process.exitcode:
            return
        lost = WorkerLost(self.worker_id, self._process.exitcode)
        _ENDED_BADLY.append((self.worker_id, self._process.exitcode))
        self.control_conn.abort(lost)
        self.data_conn.close()

    def stop_worker(self) -> None:
        self._watcher.join()


class WorkerLost(ChildProcessError):
    """A worker process ended before the pipeline did; the message names it and how it ended."""

    def __init__(self, worker_id: str, status: int):
        how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        oom = " (the signal of the kernel's out-of-memory killer)" if status == -signal.SIGKILL else ""
        super().__init__(
            f"{worker_id} of --runner multiprocess {how}{oom}, and the pipeline failed: give the workers "
            "more memory, or fewer of them (-- --direct_num_workers=N)"
        )


class MultiprocessRunner(FnApiRunner):
    """The FnApiRunner with ``--direct_num_workers`` forked workers (0: one per core)."""

    def __init__(self):
        super().__init__(default_environment=ForkedEnvironment(capabilities=python_sdk_capabilities()))

    def run_pipeline(self, pipeline, options):
        # The workers' options (log levels, file systems), as the DirectRunner gives its FnApiRunner.
        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        self._provision_info = ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        seen = len(_ENDED_BADLY)
        try:
            with without_mode_warning():
                return super().run_pipeline(pipeline, options)
        except Exception as err:  # Beam says only that a channel closed: say which worker ended, and how
            if len(_ENDED_BADLY) > seen:
                raise WorkerLost(*_ENDED_BADLY[seen]) from err
            raise

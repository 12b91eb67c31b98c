"""``--runner direct``: Beam's in-process runner with bundles at once, on SDK harness threads.

    querycache build ... -- --direct_num_workers=1      # one bundle at a time

Arrow's kernels and JSON parser run without the GIL, so two bundles on two threads of one process
overlap: 10M lines on 2 cores (AMD EPYC, AVX-512), 19.0-19.3 s against 21.3-22.1 s one at a time;
3 and 4 threads measured slower there, and the GIL caps what more cores could give (``multiprocess``
scales with them). The harness is Beam's own in-process gRPC worker, quiet about the failures it
answers (runners/harness.py: Beam's ``multi_threading`` mode prints them on the user's terminal
before the command's one line). Progress records and the driver's loaded model are shared as in
Beam's in-memory mode.
"""

from __future__ import annotations

import threading

from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.portability.fn_api_runner.worker_handlers import (
    DATA_BUFFER_TIME_LIMIT_MS,
    FNAPI_RUNNER_CAPABILITIES,
    STATE_CACHE_SIZE_MB,
    GrpcWorkerHandler,
    WorkerHandler,
)
from apache_beam.transforms.environments import Environment, python_sdk_capabilities

from querycache.runners.harness import QuietHarness, without_mode_warning

URN = "querycache:env:harness_threads:v1"


@Environment.register_urn(URN, bytes)
class ThreadEnvironment(Environment):
    """SDK harness threads in the runner's own process."""

    def to_runner_api_parameter(self, context):
        return URN, b""

    @staticmethod
    def from_runner_api_parameter(payload, capabilities, artifacts, resource_hints, context):
        return ThreadEnvironment(capabilities, artifacts, resource_hints)


@WorkerHandler.register_environment(URN, bytes)
class ThreadWorkerHandler(GrpcWorkerHandler):
    """One harness on a thread of this process, connected to the runner over loopback gRPC."""

    def __init__(self, payload, state, provision_info, grpc_server):
        super().__init__(state, provision_info, grpc_server)

    def start_worker(self) -> None:
        self._harness = QuietHarness(  # as Beam's EmbeddedGrpcWorkerHandler configures its own
            self.control_address, worker_id=self.worker_id, state_cache_size=STATE_CACHE_SIZE_MB << 20,
            data_buffer_time_limit_ms=DATA_BUFFER_TIME_LIMIT_MS, runner_capabilities=FNAPI_RUNNER_CAPABILITIES,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._harness.run, name=self.worker_id, daemon=True)
        self._thread.start()

    def stop_worker(self) -> None:
        self._thread.join()


class ThreadsRunner(FnApiRunner):
    """The FnApiRunner with ``--direct_num_workers`` harness threads in its process (0: one per core)."""

    def __init__(self):
        super().__init__(default_environment=ThreadEnvironment(capabilities=python_sdk_capabilities()))

    def run_pipeline(self, pipeline, options):
        with without_mode_warning():
            return super().run_pipeline(pipeline, options)

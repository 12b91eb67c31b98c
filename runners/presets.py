"""Runner presets: ``--runner NAME`` expands to Beam pipeline options; anything after ``--`` is appended.

querycache build ... --runner multiprocess
querycache build ... --runner dataflow -- --project=p --region=us-central1 --temp_location=gs://b/tmp
"""

from __future__ import annotations

import json
import os

from querycache.transforms.process_exit import LOCAL_WORKERS

MULTIPROCESS = "querycache.runners.multiprocess.MultiprocessRunner"
THREADS = "querycache.runners.threads.ThreadsRunner"


def _direct(cores: int) -> list[str]:
    """Two bundles at once on harness threads (runners/threads.py) where there are two cores."""
    return [f"--runner={THREADS}", "--direct_num_workers=2"] if cores > 1 else ["--runner=FnApiRunner"]


PRESETS: dict[str, list[str]] = {
    # In-process portable runner: what the DirectRunner falls back to, pinned so it never fetches Prism.
    "direct": _direct(os.cpu_count() or 1),
    # Several worker processes on this machine, forked from a warm one: one model copy per process.
    "multiprocess": [f"--runner={MULTIPROCESS}", f"--direct_num_workers={os.cpu_count() or 2}"],
    # A Beam job service (Flink, Spark or Beam's own): add --job_endpoint=HOST:PORT after --, and for
    # workers elsewhere --environment_type=DOCKER|EXTERNAL --environment_config=IMAGE|HOST:PORT.
    "portable": ["--runner=PortableRunner", "--environment_type=LOOPBACK"],
    "flink": ["--runner=FlinkRunner"],
    "spark": ["--runner=SparkRunner"],
    # Needs --project, --region, --temp_location, and usually --sdk_container_image with torch.
    "dataflow": ["--runner=DataflowRunner", "--experiments=use_runner_v2"],
}


def beam_args(runner: str, extra: list[str], quiet: bool = False) -> list[str]:
    """Pipeline options for a preset name (or any Beam runner name) plus extra options.

    Worker processes started on this machine share its cores: unless ``OMP_NUM_THREADS`` is set,
    it is set (for the workers, which inherit it) to the cores over the workers, so that each worker's
    torch does not run a thread per core against the others' (2 workers of 2 threads on 2 cores
    inferred 10x slower than one). Their log says what querycache's own says (INFO, or WARNING when
    ``quiet``), not each Beam harness's INFO lines; options given after ``--`` win.
    """
    args = [*PRESETS.get(runner.lower(), [f"--runner={runner}"]), *extra]
    options = _options(args)
    if local_workers(options):
        workers = int(options.get("direct_num_workers", "1") or 1)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(workers, 1))))
        if options.get("direct_running_mode") == "multi_processing":  # Beam's own workers: new interpreters
            os.environ[LOCAL_WORKERS] = "1"  # they skip the interpreter's teardown (transforms/process_exit.py)
        levels = {"querycache": "WARNING" if quiet else "INFO"}
        worker_log = [
            "--default_sdk_harness_log_level=WARNING",
            f"--sdk_harness_log_level_overrides={json.dumps(levels)}",
        ]
        args = [*args[: len(args) - len(extra)], *worker_log, *extra]
    return args


def local_workers(options: dict[str, str]) -> bool:
    """Whether these options run worker processes on this machine."""
    return options.get("runner") == MULTIPROCESS or options.get("direct_running_mode") == "multi_processing"


def _options(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def prestart_workers(args: list[str], pipeline: str) -> None:
    """Start the fork server of ``--runner multiprocess`` now: it imports the ``pipeline`` module
    (``querycache.pipelines.build``, ...) and what it needs while the command imports the driver's."""
    if _options(args).get("runner") == MULTIPROCESS:
        from querycache.runners.multiprocess import prestart

        prestart(pipeline)


IN_PROCESS_RUNNERS = {"fnapirunner", "directrunner", "bundlebaseddirectrunner", THREADS.lower()}


def in_process(args: list[str]) -> bool:
    """Whether these options run the workers in this process, where their progress log records arrive."""
    options = _options(args)
    runner = options.get("runner", "DirectRunner").lower()
    return runner in IN_PROCESS_RUNNERS and not local_workers(options)

"""Transforms of querycache's build pipeline."""

from querycache.transforms.process_exit import exit_workers_quickly

exit_workers_quickly()  # a no-op but in a worker process of --runner multiprocess, which imports this with a DoFn

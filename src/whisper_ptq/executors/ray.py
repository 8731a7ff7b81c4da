"""The Ray executor: a sweep on a Ray cluster, one Ray task per shard of a job.

A shard is one dataset part of a (model, recipe) job cut to at most `shard_size` utterance ids
(`Job.shards`). Its task loads and quantizes the model itself, which is wasteful but makes a task need
nothing from any other: any node can run it, and a retry starts from nothing and recomputes exactly its
ids. A task returns its events, and this process, the driver, hands them to the sweep, which alone writes
the database, so the store's resume and no-duplicate rules hold unchanged.

A task whose worker dies (killed, out of memory, node lost) or that raises a transient error is retried by
Ray up to `max_retries` times; after that, as for any other error of its job, its part gets a `Failed`
event and the sweep goes on. The rows of a shard arrive when it ends: the shard is the unit of loss as well
as of retry. Workers' output stays in Ray's logs on their node (`ray logs`), not in the sweep's dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from whisper_ptq.errors import UserError, one_line
from whisper_ptq.executors.jobs import Event, Failed, Job
from whisper_ptq.executors.worker import run_job
from whisper_ptq.settings import QUIET_LIBRARIES

try:
    import ray
    from ray.exceptions import RayError, RayTaskError
except ImportError:  # an optional extra: say how to get it rather than show a traceback
    raise UserError("--executor ray needs Ray: pip install whisper-ptq[ray]") from None

SHARD_SIZE = 25  # utterances per task: what a retry recomputes, and what one model load is spread over
MAX_RETRIES = 3
# Errors that may pass on another try (a hub download, a network filesystem). Any other error of a job
# would only recur, so it fails the shard at once.
TRANSIENT: tuple[type[Exception], ...] = (ConnectionError, TimeoutError)


# A fresh worker process per shard, as the local executor has one per job: a leak or a native crash stays
# in its shard, and the peak RSS a shard reports is its own, not that of whatever ran before it there.
@ray.remote(max_calls=1)
def _run_shard(shard: Job) -> list[Event]:
    events: list[Event] = []
    run_job(shard, events.append)
    return events


class RayExecutor:
    def __init__(
        self,
        work_dir: Path,
        address: str | None = None,
        shard_size: int = SHARD_SIZE,
        max_retries: int = MAX_RETRIES,
    ):
        del work_dir  # unused: worker logs stay on their nodes (see the module docstring)
        self.address, self.shard_size, self.max_retries = address, shard_size, max_retries

    def run(self, jobs: Sequence[Job], on_event: Callable[[Event], None]) -> None:
        with _connected(self.address):
            pending = {self._submit(shard): shard for job in jobs for shard in job.shards(self.shard_size)}
            try:
                while pending:
                    (ref,), _ = ray.wait(list(pending), num_returns=1)
                    for event in self._outcome(ref, pending.pop(ref)):
                        on_event(event)
            finally:
                for ref in pending:  # an interrupted driver takes its shards down, as the local executor does
                    ray.cancel(ref, force=True)

    def _submit(self, shard: Job) -> ray.ObjectRef:
        shard, resources = placement(shard)
        return _run_shard.options(
            **resources,
            max_retries=self.max_retries,
            retry_exceptions=list(TRANSIENT),
            runtime_env=_runtime_env(),
        ).remote(shard)

    def _outcome(self, ref: ray.ObjectRef, shard: Job) -> list[Event]:
        """The shard's events, or one `Failed` for its part once Ray has given up on it."""
        try:
            return ray.get(ref)
        except RayError as exc:
            return [Failed(shard.index, failure_message(exc, self.max_retries), shard.parts[0].dataset)]


def placement(shard: Job) -> tuple[Job, dict[str, Any]]:
    """The shard as its worker must see it, and the resources its task declares: a CPU per thread (one
    when unset: Ray then sets OMP_NUM_THREADS=1, which torch follows), and a GPU on cuda. Ray shows a task
    only the GPU it assigned, as cuda:0, so an experiment's `cuda:N` means `cuda` there."""
    cuda = shard.settings.device.startswith("cuda")
    if cuda:
        shard = replace(shard, settings=replace(shard.settings, device="cuda"))
    return shard, {"num_cpus": shard.settings.threads or 1, "num_gpus": 1 if cuda else 0}


def failure_message(exc: RayError, max_retries: int) -> str:
    """One line: the job's own error as the local executor reports it; Ray's (a worker or node lost) or a
    transient one with the bound on its retries."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(exc, RayTaskError) and not isinstance(cause, TRANSIENT):
        return one_line(cause)
    return f"{one_line(cause)} (max_retries={max_retries})"


def _runtime_env() -> dict[str, Any]:
    """The driver's WHISPER_PTQ_* variables (data root, cache, plugins) for each task, as a local worker
    inherits them, and the libraries' quiet settings; a node's own environment is that of its `ray start`."""
    env = {key: value for key, value in os.environ.items() if key.startswith("WHISPER_PTQ_")}
    return {"env_vars": {**QUIET_LIBRARIES, **env}}


@contextmanager
def _connected(address: str | None) -> Iterator[None]:
    """Ray as this process already has it (a notebook, a test: `address` is then unused), else connected
    for the run: to `address`, else where ray.init looks ($RAY_ADDRESS, a cluster `ray start`ed on this
    machine), else a new local cluster, stopped at the end."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        where = f" at {address}" if address else ""
        raise UserError(f"cannot reach the Ray cluster{where}: {one_line(exc)}") from None
    try:
        yield
    finally:
        ray.shutdown()

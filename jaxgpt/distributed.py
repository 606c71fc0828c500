"""Runs of several processes (one per host) through `jax.distributed`: start-up, agreement and failure.

`initialize` connects the processes before JAX touches a device; afterwards `jax.devices()` lists the devices of
every process and the run builds one mesh over all of them (sharding.make_mesh). Where the coordinator address,
the process count and the process id come from, first match wins:

  1. the flags `--coordinator HOST:PORT --num-processes N --process-id I`;
  2. JAX's environment: `JAX_COORDINATOR_ADDRESS` (with the count and id from the flags or from a cluster that
     jax.distributed detects);
  3. SLURM (`srun`, more than one task): jax.distributed's cluster detection reads SLURM_JOB_ID, SLURM_NTASKS,
     SLURM_PROCID and SLURM_STEP_NODELIST (the coordinator is the first node; JAX_COORDINATOR_PORT sets its port).

Anything else is a run of one process and initialises nothing. Each process owns every device of its host
(`local_device_ids=()`): jax.distributed's SLURM detection would otherwise give each process the one GPU of its
SLURM_LOCALID, the one-process-per-GPU layout. On CPU, cross-process collectives go through gloo.

Failure: the coordination service expects a heartbeat from every process; one that misses them for
`heartbeat_seconds` (killed, its host lost) makes the service end every other process with "Terminating process
because the JAX distributed service detected fatal errors ... another task died" (SIGABRT, exit 134); a process
waiting on a collective with a dead peer fails as soon as gloo or NCCL notices the lost connection, with
`error: process I of N failed: JaxRuntimeError: ...` (exit 1). An error raised in one process ends that process at
once (`exit_at_once_on_error`) so that its peers see it gone instead of waiting for it at the shutdown barrier.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.errors import UserError

DEFAULT_HEARTBEAT_SECONDS = 100  # jax.distributed's own default: long enough for a busy host to answer
DEFAULT_CONNECT_SECONDS = 300  # jax.distributed's own default: hosts of one job may start minutes apart
JOIN_GRACE_SECONDS = 10  # jax.distributed's own time limit exceeds ours by this, so that ours speaks first
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")


@dataclass(frozen=True)
class Launch:
    """How this process joins the run; None fields are left to jax.distributed's cluster detection."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS
    connect_seconds: int = DEFAULT_CONNECT_SECONDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (one per host; see docs/training.md, Multi-host)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, where the coordination service listens (default: "
                       "JAX_COORDINATOR_ADDRESS, or the first SLURM node)")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes (default: SLURM_NTASKS)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (default: SLURM_PROCID)")
    group.add_argument("--heartbeat-seconds", type=int, default=DEFAULT_HEARTBEAT_SECONDS, metavar="S",
                       help="a process silent for S seconds counts as dead and ends the others "
                       f"(default {DEFAULT_HEARTBEAT_SECONDS})")
    group.add_argument("--connect-seconds", type=int, default=DEFAULT_CONNECT_SECONDS, metavar="S",
                       help="how long a process waits for the coordinator and the others to join before it stops "
                       f"with an error (default {DEFAULT_CONNECT_SECONDS})")


def launch_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Launch | None:
    """The Launch of a run of several processes from the flags and the environment, or None for one process.
    Inconsistent flags are a UserError."""
    environ = os.environ if environ is None else environ
    n, i, coordinator = args.num_processes, args.process_id, args.coordinator
    if n is not None and n < 1:
        raise UserError(f"--num-processes must be >= 1, got {n}")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise UserError(f"--process-id must be in 0..{n - 1 if n else 'N-1'}, got {i}")
    for flag, value in (("--heartbeat-seconds", args.heartbeat_seconds), ("--connect-seconds", args.connect_seconds)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    slurm = all(v in environ for v in SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1
    jax_env = "JAX_COORDINATOR_ADDRESS" in environ
    if n == 1 or (n is None and i is None and coordinator is None and not slurm and not jax_env):
        return None
    if not slurm:
        missing = [flag for flag, value in (("--num-processes", n), ("--process-id", i)) if value is None]
        if coordinator is None and not jax_env:
            missing.insert(0, "--coordinator (or JAX_COORDINATOR_ADDRESS)")
        if missing:
            raise UserError(f"a run of several processes outside SLURM needs {', '.join(missing)}")
    return Launch(coordinator, n, i, args.heartbeat_seconds, args.connect_seconds)


def wait_for_coordinator(address: str, deadline: float, seconds: int) -> None:
    """Wait until the coordinator at HOST:PORT accepts connections (process 0 may start later than the others), or
    raise a UserError at `deadline` (time.monotonic()). jax.distributed itself ends a process whose coordinator
    never answers with SIGABRT and a C++ stack trace."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"the coordinator address must be HOST:PORT, got {address!r}")
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(f"no coordinator answered at {address} within {seconds} s (--connect-seconds): "
                                f"{e.strerror or e}; is process 0 running there?") from None
            time.sleep(0.5)


def initialize(launch: Launch | None) -> None:
    """Join the run of several processes `launch` describes (nothing for None); call before any JAX computation.
    Processes that have not all joined after --connect-seconds stop with one line (exit 2): jax.distributed's own
    time limit, set later than ours, would end them with SIGABRT and a C++ stack trace."""
    if launch is None:
        return
    deadline = time.monotonic() + launch.connect_seconds
    address = launch.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and launch.process_id:  # process 0 hosts the coordinator; SLURM's address is jax.distributed's
        wait_for_coordinator(address, deadline, launch.connect_seconds)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    count = f"all {launch.num_processes}" if launch.num_processes else "all the"
    not_joined = threading.Timer(max(0.0, deadline - time.monotonic()), _exit_now, (2, (
        f"error: not {count} processes joined within {launch.connect_seconds} s (--connect-seconds); start each "
        "one with the same --num-processes and a --coordinator that names process 0's host")))
    not_joined.daemon = True
    not_joined.start()
    try:
        jax.distributed.initialize(
            launch.coordinator, launch.num_processes, launch.process_id, local_device_ids=(),
            initialization_timeout=launch.connect_seconds + JOIN_GRACE_SECONDS,
            heartbeat_timeout_seconds=launch.heartbeat_seconds,
        )
    except (RuntimeError, ValueError) as e:  # a bad address, ids that do not match
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"jax.distributed could not connect the processes: {line}") from None
    finally:
        not_joined.cancel()


def is_primary() -> bool:
    """Process 0: the one that writes the run's logs, metrics and plots."""
    return jax.process_index() == 0


class Vote:
    """Whether a flag (a stop request) is raised on any process, agreed by all of them one step late so that the
    training loop never waits for the devices: `cast(flag)`, called by every process after it dispatches step k,
    queues a one-element-per-device OR over `mesh` behind step k and returns the outcome of the cast after step
    k - 1, finished by then. With one process, `cast` returns the flag itself."""

    def __init__(self, mesh: Mesh):
        self._sharding = NamedSharding(mesh, P(mesh.axis_names))
        self._size = mesh.devices.size
        self._any = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))
        self._pending: jax.Array | None = None

    def cast(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        votes = jax.make_array_from_callback((self._size,), self._sharding, lambda index: np.array([flag]))
        previous, self._pending = self._pending, self._any(votes)
        return previous is not None and bool(previous)


def barrier(name: str) -> None:
    """Wait until every process has got here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextmanager
def exit_at_once_on_error() -> Iterator[None]:
    """In a run of several processes, a process that fails (an exception, or sys.exit with a non-zero code) prints
    its error and exits at once: the normal exit would wait at jax.distributed's shutdown barrier for peers that
    are themselves waiting for this process in a collective. With this process gone, they stop as described in
    the module docstring. With one process this does nothing."""
    if not jax.distributed.is_initialized():
        yield
        return
    try:
        yield
    except SystemExit as e:
        if e.code in (0, None):
            raise
        _exit_now(e.code if isinstance(e.code, int) else 1, None if isinstance(e.code, int) else str(e.code))
    except UserError as e:
        _exit_now(2, f"error: process {jax.process_index()}: {e}")
    except BaseException as e:
        import traceback

        traceback.print_exc()
        lost = isinstance(e, jax.errors.JaxRuntimeError)  # such as a collective whose peer has gone
        _exit_now(1, f"error: process {jax.process_index()} of {jax.process_count()} failed: "
                  f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                  + ("; another process may have stopped: see its output" if lost else ""))


def _exit_now(code: int, line: str | None) -> None:
    if line:
        print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Multi-process initialisation on JAX's own distributed runtime, and bounded failure when a process is lost.

`initialize` starts JAX's coordination service (process 0) and client (every process) from explicit flags
(`--coordinator_address`, `--num_processes`, `--process_id`) or from the cluster environment JAX detects itself
(SLURM under `srun`, Cloud TPU VMs, Open MPI). Timeouts and the coordinator's bind address come from
`config.distributed`; a coordinator on a loopback address binds loopback only.

Bounded failure: JAX's runtime notices a dead process only after `heartbeat_timeout_s`, and then aborts with a C++
dump (or a collective fails first with a bare `JaxRuntimeError`). A small watchdog thread per process therefore
publishes a beat in the coordination service's key-value store and reads the others' beats: a process whose beat
has not moved for half of `heartbeat_timeout_s`, or a coordination service that no longer answers (process 0 is
gone), ends this process with one `error:` line naming the lost process and its host, before JAX's own abort.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax

from big_embed.errors import ConfigError, TrainingError

# Environment variables under which `jax.distributed.initialize()` finds the cluster by itself.
_AUTO_DETECT_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                    "OMPI_COMM_WORLD_SIZE")
# What `srun` sets and JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_BEATS = "big_embed/alive/"  # key-value directory of the watchdogs' beats: process id -> "count hostname"
_EXITED = "exited"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int = 0, distributed: Mapping[str, Any] | None = None,
               ) -> None:
  """Must run before any other JAX call.

  Args:
    coordinator_address: "host:port" of process 0; with `num_processes` and `process_id` starts a multi-process
      run explicitly (e.g. several processes on one machine, see launch/simulate_multihost.sh).
    cpu_devices: if > 0, the number of (fake) CPU devices of this process.
    distributed: `config.distributed` (initialization_timeout_s, heartbeat_timeout_s, coordinator_bind_address);
      None: the schema's defaults (300 s, 100 s, loopback for a loopback coordinator, else all interfaces).
  Without a coordinator, initialises from the cluster environment (SLURM, TPU VM) when one is detected,
  otherwise stays a single process. Raises ConfigError (one line) when the flags or the detected environment are
  incomplete. A multi-process run gets the watchdog described in the module docstring.
  """
  d = dict(distributed or {})
  init_timeout = int(d.get("initialization_timeout_s", 300))
  heartbeat_timeout = int(d.get("heartbeat_timeout_s", 100))
  if cpu_devices > 0:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  local_device_ids = None
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ConfigError("--coordinator_address needs --num_processes and --process_id")
  elif num_processes is not None or process_id is not None:
    raise ConfigError("--num_processes and --process_id need --coordinator_address host:port of process 0")
  elif any(k in os.environ for k in _AUTO_DETECT_ENV):
    coordinator_address, num_processes, process_id, local_device_ids = _detect_cluster(init_timeout)
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):  # e.g. one process per node with all its GPUs: JAX reads it
      local_device_ids = None
  else:
    return
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=init_timeout, heartbeat_timeout_seconds=heartbeat_timeout,
                             coordinator_bind_address=bind_address(coordinator_address,
                                                                   d.get("coordinator_bind_address", "")))
  if num_processes > 1:
    _Watchdog(process_id, num_processes, heartbeat_timeout).start()


def barrier(name: str, timeout_s: int) -> None:
  """Waits until every process has reached `name` (the coordination service's barrier; nothing for one process).

  The training loop calls it before the first run of each compiled step: processes finish compiling at different
  times, and on CPU the first collective's Gloo rendezvous gives up when a peer joins more than 30 s late.
  Raises TrainingError (one line) when a process has not arrived after `timeout_s`.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the client initialize started)
  client = distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return
  try:
    client.wait_at_barrier(name, timeout_s * 1000)
  except jax.errors.JaxRuntimeError as err:
    raise TrainingError(f"not every process reached {name!r} within {timeout_s} s "
                        f"(distributed.initialization_timeout_s): {str(err).splitlines()[0][:160]}") from None


def bind_address(coordinator_address: str, configured: str = "") -> str | None:
  """The address:port process 0's coordination service listens on.

  A configured address wins; a coordinator on a loopback address (localhost, 127.x, ::1) binds that address only
  (no other machine can join it anyway); otherwise None: JAX's default, all interfaces on the coordinator's port.
  """
  if configured:
    return configured
  host, sep, port = coordinator_address.rpartition(":")
  if not sep or not port.isdigit():
    raise ConfigError(f"--coordinator_address {coordinator_address!r}: expected host:port")
  host = host.strip("[]")
  try:
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
  except ValueError:  # a host name
    loopback = False
  return coordinator_address if loopback else None


def _detect_cluster(init_timeout: int):
  """(coordinator address, process count, process id, local device ids) from JAX's own cluster detection."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  (JAX's detection, the one initialize runs)
  if "SLURM_JOB_ID" in os.environ and not all(k in os.environ for k in _SLURM_ENV):
    missing = ", ".join(k for k in _SLURM_ENV if k not in os.environ)
    raise ConfigError(f"SLURM_JOB_ID is set but not {missing} (a shell from salloc, not a job step): launch with "
                      "`srun python -m big_embed.main ...` (see launch/slurm.sbatch), or pass --coordinator_address "
                      "host:port, --num_processes and --process_id")
  try:
    found = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, init_timeout)
  except Exception as err:  # pylint: disable=broad-except  (a detector that cannot reach its metadata)
    raise ConfigError(f"cluster auto-detection failed ({type(err).__name__}: {err}); pass --coordinator_address "
                      "host:port, --num_processes and --process_id") from None
  if None in found[:3]:
    present = ", ".join(k for k in _AUTO_DETECT_ENV if k in os.environ)
    raise ConfigError(f"{present} set, but JAX could not detect the cluster from the environment: launch with the "
                      "cluster's launcher (srun, gcloud ... --worker=all, mpirun), or pass --coordinator_address "
                      "host:port, --num_processes and --process_id")
  return found


class _Watchdog(threading.Thread):
  """Ends this process with one line when another process (or the coordination service) stops answering."""

  def __init__(self, process_id: int, num_processes: int, heartbeat_timeout_s: int):
    super().__init__(name="big_embed-watchdog", daemon=True)
    self.process_id, self.num_processes = process_id, num_processes
    self.heartbeat_timeout_s = heartbeat_timeout_s
    self.lost_after_s = heartbeat_timeout_s / 2  # well before JAX's own abort at heartbeat_timeout_s
    self.interval_s = max(0.5, heartbeat_timeout_s / 10)
    self.host = socket.gethostname()
    from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the client initialize started)
    self.client = distributed.global_state.client
    self.stopped = threading.Event()
    self.lost = threading.Event()
    self.message = ""

  def start(self):
    self._beat(0)
    super().start()
    atexit.register(self.stop)  # runs before JAX's own shutdown (atexit is last in, first out)
    previous_hook = sys.excepthook

    def excepthook(kind, value, tb):  # a collective that failed because a peer died: report the peer instead
      if isinstance(value, jax.errors.JaxRuntimeError) and self.lost.wait(self.lost_after_s + 2 * self.interval_s):
        self._exit()
      previous_hook(kind, value, tb)
    sys.excepthook = excepthook

  def stop(self):
    """A normal exit (or a one-line error): the others must not report this process as lost."""
    if not self.stopped.is_set():
      self.stopped.set()
      try:
        self.client.key_value_set(f"{_BEATS}{self.process_id}", f"{_EXITED} {self.host}", allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  (the service is already gone)
        pass

  def _beat(self, count: int):
    self.client.key_value_set(f"{_BEATS}{self.process_id}", f"{count} {self.host}", allow_overwrite=True)

  def run(self):
    seen: dict[int, tuple[str, float]] = {}  # process id -> (last beat, when it changed on this clock)
    started, count = time.monotonic(), 0
    while not self.stopped.wait(self.interval_s):
      count += 1
      try:
        self._beat(count)
        beats = dict(self.client.key_value_dir_get(_BEATS))
      except Exception as err:  # pylint: disable=broad-except  (the coordination service no longer answers)
        if self.stopped.is_set():
          return
        if self.process_id == 0:  # it runs the service itself: nothing to name
          return
        self._lose(0, "", f"the coordination service it runs stopped answering ({str(err).splitlines()[0][:120]})")
        return
      now = time.monotonic()
      for other in range(self.num_processes):
        value = beats.get(f"{_BEATS}{other}", "")
        if other == self.process_id or value.startswith(_EXITED):
          continue
        if seen.get(other, ("",))[0] != value:
          seen[other] = (value, now)
        last_change = seen[other][1] if value else started
        if now - last_change > self.lost_after_s:
          self._lose(other, value.partition(" ")[2], f"no beat for {now - last_change:.0f} s")
          return

  def _lose(self, other: int, host: str, why: str):
    on = f" on {host}" if host else ""
    self.message = (f"error: lost process {other}{on}: {why} (distributed.heartbeat_timeout_s="
                    f"{self.heartbeat_timeout_s}); stopping process {self.process_id}. Rerun the same command on "
                    "every host to resume from the last checkpoint.")
    self.lost.set()
    self._exit()

  def _exit(self):
    print(f"\n{self.message}", file=sys.stderr, flush=True)  # after a progress bar, on a line of its own
    os._exit(1)  # not sys.exit: JAX's shutdown would wait for the lost process, then abort with a C++ dump

"""Multi-process initialisation: explicit coordinator flags, cluster auto-detection, fake CPU devices."""

from __future__ import annotations

import os

import jax

from big_embed.errors import ConfigError

# Environment variables under which `jax.distributed.initialize()` finds the cluster by itself.
_AUTO_DETECT_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                    "OMPI_COMM_WORLD_SIZE")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int = 0, timeout_s: int = 300) -> None:
  """Must run before any other JAX call.

  Args:
    coordinator_address: "host:port" of process 0; with `num_processes` and `process_id` starts a multi-process
      run explicitly (e.g. several processes on one machine, see launch/simulate_multihost.sh).
    cpu_devices: if > 0, the number of (fake) CPU devices of this process.
    timeout_s: how long to wait for the other processes to join.
  Without a coordinator, initialises from the cluster environment (SLURM, TPU VM) when one is detected,
  otherwise stays a single process.
  """
  if cpu_devices > 0:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ConfigError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
  elif any(k in os.environ for k in _AUTO_DETECT_ENV):
    jax.distributed.initialize(initialization_timeout=timeout_s)

"""Entry point: `python -m big_embed.main --config configs/quickstart.py --workdir runs/quickstart`.

Every config field can be overridden on the command line, e.g. `--config.train.batch_size=256`.
Modes: `train` (default; resumes from the newest checkpoint in the workdir) and `eval` (evaluates it).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/quickstart.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process runs: host:port of process 0 (SLURM / TPU VMs are auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: index of this process.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "If > 0, simulate this many CPU devices in this process.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that flag errors are reported before the (slower) JAX stack loads, and so that
  # multi-process initialisation comes before anything touches a JAX backend.
  from big_embed.parallel import multihost  # pylint: disable=g-import-not-at-top
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _CPU_DEVICES.value)

  from big_embed.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from big_embed.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from big_embed.errors import UserError  # pylint: disable=g-import-not-at-top
  from big_embed.parallel.mesh import MeshError  # pylint: disable=g-import-not-at-top
  from big_embed.train import loop  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.ERROR)  # TFDS and Orbax are chatty at INFO/WARNING
  try:
    if _MODE.value == "train":
      loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      loop.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  except (UserError, DataError, MeshError, CheckpointError) as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


def _parse_flags(argv):
  """absl flag parsing, with config typos and bad values reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    message = str(err)
  except (AttributeError, KeyError) as err:  # ml_collections: an override names a field the config lacks
    message = "unknown config field " + str(err).strip("'\"").replace("\\n", " ")
  except Exception as err:  # pylint: disable=broad-except  (errors raised while loading the config file)
    message = f"{type(err).__name__}: {err}"
  message = " ".join(message.replace("\\'", "'").split())
  print(f"error: {message} (see --helpfull for flags; config fields live in the --config file)",
        file=sys.stderr, flush=True)
  sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

"""Entry point: `python -m big_embed.main --config configs/quickstart.py --workdir runs/quickstart`.

Every config field can be overridden on the command line, e.g. `--config.train.batch_size=256` or
`--config.loss.tile_size=4096`. Modes: `train` (default; resumes from the newest checkpoint in the workdir),
`eval` (evaluates it) and `compile` (compiles the train step for the config's mesh and prints its memory, FLOPs and
parameter bytes per device, without creating parameters; with `--cpu_devices N`, on N fake CPU devices).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from big_embed import config_utils
from big_embed.errors import UserError, exit_on_user_error

_CONFIG_HELP = "Recipe file, e.g. configs/quickstart.py[:arg]."
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "compile"],
                          "train; eval (the newest checkpoint); compile (the train step's cost per device, no params)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process runs: host:port of process 0 (SLURM / TPU VMs are auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: index of this process.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "If > 0, run on this many simulated CPU devices in this "
                                    "process (e.g. --mode compile of a pod config on a laptop).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here, not at the top: recipes load without JAX, so that a flag error is reported before the JAX
  # stack loads; and multi-process initialisation must come before anything touches a JAX backend.
  with exit_on_user_error():
    from big_embed.parallel import multihost  # pylint: disable=g-import-not-at-top
    if _CPU_DEVICES.value > 0:  # the simulated devices are the devices, also on a machine with accelerators
      import jax  # pylint: disable=g-import-not-at-top
      jax.config.update("jax_platforms", "cpu")
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _CPU_DEVICES.value)
    from big_embed.train import loop  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.ERROR)  # TFDS and Orbax are chatty at INFO/WARNING
    if _MODE.value == "train":
      loop.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
    elif _MODE.value == "compile":
      from big_embed.train import compile_only  # pylint: disable=g-import-not-at-top
      compile_only.compile_train_step(flags.FLAGS.config, _WORKDIR.value)
    else:
      loop.evaluate_checkpoint(flags.FLAGS.config, _WORKDIR.value)


def _recipe_flag(argv: list[str]) -> tuple[str | None, list[str]]:
  """(the value of --config, argv without it)."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1], argv[:i] + argv[i + 2:]
    if arg.startswith("--config="):
      return arg[len("--config="):], argv[:i] + argv[i + 1:]
  return None, argv


def _define_config_flag(argv: list[str]) -> list[str]:
  """Defines --config; returns the argv to parse.

  A recipe's `config.loss` holds the fields the recipe sets (the loss fills in its defaults when the run starts),
  so an override of another loss field (`--config.loss.tile_size=4096`) needs the loss's whole field list: then
  the recipe is loaded here with its loss resolved (importing the loss library, and JAX), and --config is that
  config. Otherwise the recipe loads lazily, without JAX, and flag errors come at once.
  """
  recipe, rest = _recipe_flag(argv)
  if recipe is not None and any(a.startswith("--config.loss.") for a in rest):
    from big_embed import losses  # pylint: disable=g-import-not-at-top  (JAX only when a loss field is set)
    path, _, recipe_arg = recipe.partition(":")
    config = config_utils.load_recipe(path, recipe_arg or None)
    config.loss = losses.resolve(config.loss)
    config_flags.DEFINE_config_dict("config", config, _CONFIG_HELP, lock_config=True, sys_argv=rest)
    return rest
  config_flags.DEFINE_config_file("config", None, _CONFIG_HELP, lock_config=True)
  flags.mark_flag_as_required("config")
  return argv


def _parse_flags(argv):
  """absl flag parsing, with config typos and bad values reported as one line instead of a traceback."""
  try:
    rest = flags.FLAGS(_define_config_flag(argv))
    flags.FLAGS.config.keys()  # a recipe that failed to load raises on first use: make that now
    return rest
  except flags.Error as err:
    message = str(err)
    if "Traceback" in message:  # the recipe raised: its exception (the traceback's last line) is the message
      last = message.strip().splitlines()[-1]
      message = f"--config: {last.split(': ', 1)[-1] if last.split(':', 1)[0].endswith('Error') else last}"
  except UserError as err:  # a recipe argument or a loss field, checked while the recipe loads
    message = str(err)
  except (AttributeError, KeyError) as err:  # ml_collections: an override names a field the config lacks
    message = "unknown config field " + str(err).strip("'\"").replace("\\n", " ")
  except Exception as err:  # pylint: disable=broad-except  (errors raised while loading the config file)
    message = f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else str(err).splitlines()[-1].strip()
  message = " ".join(message.replace("\\'", "'").split())
  print(f"error: {message} (see --helpfull for flags; config fields live in the --config file)",
        file=sys.stderr, flush=True)
  sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

"""Entry point: `python -m big_embed.main --config configs/quickstart.py --workdir runs/quickstart`.

Every config field can be overridden on the command line, e.g. `--config.train.batch_size=256` or
`--config.loss.tile_size=4096`. Modes: `train` (default; resumes from the newest checkpoint in the workdir),
`eval` (evaluates it) and `compile` (compiles the train step for the config's mesh and prints its memory, FLOPs and
parameter bytes per device, without creating parameters; with `--cpu_devices N`, on N fake CPU devices).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from big_embed import config_schema
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
flags.register_validator("workdir", lambda path: path is None or bool(path.strip()),
                         message="--workdir is empty; pass the run's directory, e.g. --workdir=runs/quickstart")
flags.register_validator("workdir", lambda path: not path or not os.path.exists(path) or os.path.isdir(path),
                         message="--workdir names a file, not a directory; pass the run's directory")


def main(argv):
  del argv  # `_parse_flags` rejects positional arguments
  # Imported here, not at the top: recipes load without JAX, so that a flag error is reported before the JAX
  # stack loads; and multi-process initialisation must come before anything touches a JAX backend.
  with exit_on_user_error():
    config_schema.validate(flags.FLAGS.config)  # every field's type and range, before JAX starts
    from big_embed.parallel import multihost  # pylint: disable=g-import-not-at-top
    if _CPU_DEVICES.value > 0:  # the simulated devices are the devices, also on a machine with accelerators
      import jax  # pylint: disable=g-import-not-at-top
      jax.config.update("jax_platforms", "cpu")
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _CPU_DEVICES.value,
                         flags.FLAGS.config.distributed)
    from big_embed.train import loop  # pylint: disable=g-import-not-at-top
    # TFDS and Orbax are chatty at INFO/WARNING, and a failed background save is logged with its traceback
    # from several threads before big_embed reports it in one line: their logs stay quiet.
    logging.set_verbosity(logging.FATAL)
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    sys.unraisablehook = _quiet_async_leftovers
    if _MODE.value == "train":
      loop.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
    elif _MODE.value == "compile":
      from big_embed.train import compile_only  # pylint: disable=g-import-not-at-top
      compile_only.compile_train_step(flags.FLAGS.config, _WORKDIR.value)
    else:
      loop.evaluate_checkpoint(flags.FLAGS.config, _WORKDIR.value)


def _quiet_async_leftovers(unraisable) -> None:
  """The callbacks of a failed background write that find Orbax's event loop closed are dropped (their failure is
  reported once, as the run's error line); any other unraisable exception is printed as usual."""
  frames = []
  tb = unraisable.exc_traceback
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  if any(f"{os.sep}asyncio{os.sep}" in f or f"{os.sep}orbax{os.sep}" in f for f in frames):
    return
  sys.__unraisablehook__(unraisable)


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

  The recipe is loaded here (`config_utils.load_recipe`: whatever fails in it is one ConfigError naming it), and
  --config is its config. A recipe's `config.loss` holds the fields the recipe sets (the loss fills in its defaults
  when the run starts), so an override of another loss field (`--config.loss.tile_size=4096`) needs the loss's
  whole field list: then the loss is resolved here too (importing the loss library, and JAX). Otherwise no JAX
  loads, and flag errors come at once. Without --config, absl reports the missing flag.
  """
  recipe, rest = _recipe_flag(argv)
  if recipe is None:
    config_flags.DEFINE_config_file("config", None, _CONFIG_HELP, lock_config=True)
    flags.mark_flag_as_required("config")
    return argv
  path, _, recipe_arg = recipe.partition(":")
  config = config_utils.load_recipe(path, recipe_arg or None)
  if any(a.startswith("--config.loss.") for a in rest):
    from big_embed import losses  # pylint: disable=g-import-not-at-top  (JAX only when a loss field is set)
    config.loss = losses.resolve(config.loss)
  config_flags.DEFINE_config_dict("config", config, _CONFIG_HELP, lock_config=True, sys_argv=rest)
  return rest


def _parse_flags(argv):
  """absl flag parsing; a bad flag, recipe, override or positional argument is one `error:` line (exit 2)."""
  try:
    rest = flags.FLAGS(_define_config_flag(argv))
    if len(rest) <= 1:
      return rest
    message = f"unexpected arguments: {' '.join(rest[1:])}; every setting is a --flag or a --config.<field>"
  except flags.Error as err:  # an unknown flag or enum value, a missing or empty required flag, a bad override
    message = str(err)
  except UserError as err:  # the recipe (`config_utils.load_recipe`) or a loss field
    message = str(err)
  except (AttributeError, KeyError) as err:  # ml_collections: an override names a field the config lacks
    message = "unknown config field " + str(err).strip("'\"").replace("\\n", " ")
  except (TypeError, ValueError) as err:  # ml_collections: an override's value does not parse as the field's type
    message = f"{type(err).__name__}: {err}"
  message = " ".join(message.replace("\\'", "'").split())
  print(f"error: {message} (see --helpfull for flags; config fields live in the --config file)",
        file=sys.stderr, flush=True)
  sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

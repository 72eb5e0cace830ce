"""Orbax checkpoints of the train state, the data iterator position and run metadata.

A checkpoint step directory is written to a temporary name and renamed when complete, so a crash or a full
disk never leaves a half-written checkpoint that a restart would pick up.
"""

from __future__ import annotations

import errno
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from big_embed.errors import UserError


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be written or read; the message says which one is intact."""


def _explain(err: BaseException, directory: pathlib.Path, latest: int | None) -> CheckpointError:
  kept = f"the last complete checkpoint (step {latest}) is intact" if latest is not None else "no checkpoint was kept"
  if isinstance(err, OSError) and err.errno == errno.ENOSPC:
    why = "the disk is full"
    fix = "free space there (or use another --workdir) and rerun the same command to resume"
  else:
    why = f"{type(err).__name__}: {err}"
    fix = "check that the directory is writable and rerun the same command to resume"
  return CheckpointError(f"could not write a checkpoint in {directory} ({why}); {kept}; {fix}")


class Checkpointer:
  """Keeps the newest `max_to_keep` checkpoints of (state, meta, data_iter) under `directory`."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, async_save: bool = True,
               create: bool = True):
    """`create=False` opens an existing directory only (e.g. to read another run); nothing is created."""
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                             create=create),
        item_names=("state", "meta", "data_iter"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def delete(self, step: int) -> None:
    self._manager.delete(step)

  def save(self, step: int, state: Any, meta: dict, data_iter: Any | None = None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    latest = self.latest_step()
    try:
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as err:  # pylint: disable=broad-except
      raise _explain(err, self.directory, latest) from err

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> tuple[Any, dict]:
    """`abstract_state`: a tree of jax.ShapeDtypeStruct with `.sharding` (the mesh to restore onto)."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def restore_params(self, step: int, abstract_model_params: Any) -> Any:
    """Only the model's params (`state.params["model"]`) of checkpoint `step`, onto the shardings of
    `abstract_model_params` (jax.ShapeDtypeStruct leaves); the optimizer state is not read."""
    target = {"params": {"model": abstract_model_params}}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    state = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=state))["state"]["params"]["model"]

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    latest = self.latest_step()
    try:
      self._manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise _explain(err, self.directory, latest) from err

  def close(self):
    self.wait()
    self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)

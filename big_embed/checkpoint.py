"""Orbax checkpoints of the train state, the data iterator position and run metadata, verified when read.

Writing: a step directory is written under a temporary name and renamed when complete (Orbax), so a crash or a
full disk never leaves a half-written checkpoint that a restart would pick up. Before a state is written, a
fingerprint of every array is computed on the devices (`fingerprints`: one uint32 per array, no array leaves the
devices); a state holding a non-finite value is refused. The fingerprints, and a CRC of each process's
data-iterator state, go into the checkpoint's meta.

Reading: `restore` checks what it read against the meta (every array's fingerprint, the data-iterator CRCs); a
file that cannot be read or a mismatch raises `DamagedCheckpoint`. `restore_newest_intact` tries the steps from
the newest down, reports each damaged one in one warning line (and, when training, moves it aside into
`damaged/`, so that nothing intact is ever deleted because of it) and returns the newest that verifies.
"""

from __future__ import annotations

import errno
import json
import pathlib
import sys
import time
import zlib
from typing import Any, Callable, TypeVar

import grain
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from big_embed.errors import ConfigError, TrainingError, UserError

DAMAGED = "damaged"  # <checkpoints>/damaged/<step>: checkpoints that failed verification, kept for inspection
T = TypeVar("T")


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be written or read; the message says which one is intact."""


class DamagedCheckpoint(Exception):
  """Checkpoint `step` cannot be read or does not match its fingerprints; `reason` says what is wrong."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"step {step}: {reason}")
    self.step, self.reason = step, reason


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(uint32 fingerprint of the array's bits, whether it is finite). The fingerprint is Σ_i bits_i · (2i + 1)
  mod 2^32: the weights are odd, so any change of one element (e.g. one flipped bit) changes it."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
  odd = 2 * lax.iota(jnp.uint32, bits.size) + 1
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return jnp.sum(bits * odd, dtype=jnp.uint32), finite


@jax.jit
def _summaries(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  if not leaves:
    return jnp.zeros((0,), jnp.uint32), jnp.zeros((0,), bool)
  hashes, finite = zip(*map(_leaf_summary, leaves))
  return jnp.stack(hashes), jnp.stack(finite)


def fingerprints(tree: Any) -> tuple[dict[str, int], list[str]]:
  """({array name: fingerprint}, names of the arrays holding a non-finite value) of a pytree of (sharded) arrays.

  Names are the pytree paths joined with "/" (e.g. "params/model/text/embed"), the same for a `TrainState` and a
  nested dict with the same keys, so a restore of part of the state checks against the full state's record.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]
  hashes, finite = jax.device_get(_summaries([leaf for _, leaf in flat]))
  return dict(zip(names, map(int, hashes))), [n for n, ok in zip(names, finite) if not ok]


def _iter_crc(state: Any) -> int:
  return zlib.crc32(json.dumps(state, sort_keys=True).encode())


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (the processes must agree on the checkpoint they restore)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


def _first_line(err: BaseException) -> str:
  lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
  text = lines[0].split(" See full TensorStore details")[0] if lines else type(err).__name__
  return (text[:220] + " ...") if len(text) > 220 else text


# ---------------------------------------------------------------------------------------------------------------
# The checkpointer


def why_failed(err: BaseException) -> str:
  """What went wrong in a failed write, in a few words ("the disk is full", ...)."""
  full = isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left on device" in str(err)
  read_only = isinstance(err, OSError) and err.errno == errno.EROFS or "Read-only file system" in str(err)
  return "the disk is full" if full else "the file system is read-only" if read_only else _first_line(err)


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
    self.intact: int | None = self._manager.latest_step()  # newest step known complete (verified once read)
    self._in_flight: int | None = None  # the step an asynchronous save is writing

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_dirs(self) -> list[int]:
    """Every step directory, complete or not (an empty or damaged one included), oldest first."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

  # -- writing --------------------------------------------------------------------------------------------------

  def _finished(self) -> None:
    """Waits for the save in flight; it is intact if it raised nothing and its step directory is in place."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()
    if self._in_flight is not None:
      if (self.directory / str(self._in_flight)).is_dir():
        self.intact = self._in_flight
      self._in_flight = None

  def newest_intact(self) -> str:
    """"the newest intact checkpoint is step N" (after waiting for a save in flight), for error messages."""
    try:
      self._finished()
    except Exception:  # pylint: disable=broad-except  (the save in flight failed: it is not intact)
      self._in_flight = None
    return (f"the newest intact checkpoint is step {self.intact}" if self.intact is not None else
            "no checkpoint was written yet")

  def _failed(self, err: BaseException, step: int | None) -> CheckpointError:
    kept = (f"the newest intact checkpoint is step {self.intact}" if self.intact is not None else
            "no checkpoint was written yet")
    why = why_failed(err)
    fix = ("free space there (or use another --workdir) and rerun the same command to resume" if "full" in why
           else "make the directory writable and rerun the same command to resume")
    return CheckpointError(f"could not write the checkpoint of step {step} in {self.directory} ({why}); {kept}; "
                           f"{fix}")

  def check(self) -> None:
    """Raises the failure of a background save, if one failed (cheap: no waiting)."""
    try:
      self._manager.check_for_errors()
    except Exception as err:  # pylint: disable=broad-except
      raise self._failed(err, self._in_flight) from err

  def save(self, step: int, state: Any, meta: dict, data_iter: Any | None = None) -> None:
    """Writes checkpoint `step` (in the background when asynchronous), with the state's fingerprints in `meta`.

    Raises:
      TrainingError: the state holds a non-finite value (nothing is written).
      CheckpointError: this or the previous background save failed (full or read-only disk).
    """
    self.wait()  # the previous save: done (and intact) or failed
    hashes, nonfinite = fingerprints(state)
    if nonfinite:
      raise TrainingError(f"refusing to write the checkpoint of step {step}: {len(nonfinite)} arrays hold "
                          f"non-finite values ({', '.join(nonfinite[:3])}{', ...' if len(nonfinite) > 3 else ''})"
                          f"; {self.newest_intact()}")
    meta = {**meta, "fingerprints": hashes}
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      crc = np.array(_iter_crc(data_iter.get_state()), np.int64)
      meta["data_iter_crc"] = [int(c) for c in np.ravel(
          multihost_utils.process_allgather(crc) if jax.process_count() > 1 else crc)]
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    items["meta"] = ocp.args.JsonSave(meta)
    self._in_flight = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as err:  # pylint: disable=broad-except
      raise self._failed(err, step) from err
    if not self._manager.is_saving_in_progress():  # a synchronous save: done
      self.wait()

  def wait(self) -> None:
    try:
      self._finished()
    except Exception as err:  # pylint: disable=broad-except
      raise self._failed(err, self._in_flight) from err

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  # -- reading --------------------------------------------------------------------------------------------------

  def _read(self, step: int, what: str, args: Any) -> Any:
    try:
      return self._manager.restore(step, args=args)
    except Exception as err:  # pylint: disable=broad-except  (TensorStore, JSON, missing files: all damage)
      raise DamagedCheckpoint(step, f"its {what} cannot be read: {_first_line(err)}") from err

  def restore_meta(self, step: int) -> dict:
    """The meta of checkpoint `step` (config, process count, fingerprints); `DamagedCheckpoint` if unreadable."""
    if not (self.directory / str(step) / "meta").is_dir():
      raise DamagedCheckpoint(step, "it has no meta (an empty or partly deleted step directory)")
    meta = self._read(step, "meta", ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprints"), dict):
      raise DamagedCheckpoint(step, "its meta has no array fingerprints")
    return meta

  def _check_data_iter(self, step: int, meta: dict) -> None:
    """Each process's data-iterator file parses and matches the CRC recorded when it was written."""
    crcs = meta.get("data_iter_crc")
    if crcs is None:
      return
    for i, want in enumerate(crcs):
      path = self.directory / str(step) / "data_iter" / f"process_{i}-of-{len(crcs)}.json"
      try:
        got = _iter_crc(json.loads(path.read_text(encoding="utf-8")))
      except (OSError, ValueError) as err:
        raise DamagedCheckpoint(step, f"its data-iterator state {path.name} cannot be read: {_first_line(err)}")
      if got != want:
        raise DamagedCheckpoint(step, f"its data-iterator state {path.name} does not match its CRC")

  def _check_shapes(self, step: int, abstract: Any, prefix: str = "") -> None:
    """The saved arrays have the shapes `abstract` expects: otherwise the config changed (not damage)."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(m.shape)
               for p, m in jax.tree_util.tree_flatten_with_path(saved)[0] if hasattr(m, "shape")}
    except Exception as err:  # pylint: disable=broad-except
      raise DamagedCheckpoint(step, f"its array metadata cannot be read: {_first_line(err)}") from err
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
      name = prefix + jax.tree_util.keystr(path, simple=True, separator="/")
      if name in saved and saved[name] != tuple(leaf.shape):
        raise ConfigError(f"the checkpoint of step {step} in {self.directory} does not match this config: {name} "
                          f"has shape {saved[name]} there, {tuple(leaf.shape)} here; use a new --workdir for a "
                          "different model, or the config the run was started with")

  @staticmethod
  def _verify(step: int, meta: dict, restored: Any) -> None:
    got, _ = fingerprints(restored)
    want = meta["fingerprints"]
    missing = [n for n in got if n not in want]
    bad = [n for n in got if n in want and want[n] != got[n]]
    if missing or bad:
      names = bad or missing
      raise DamagedCheckpoint(step, f"{len(names)} arrays do not match their fingerprints ({', '.join(names[:3])}"
                              f"{', ...' if len(names) > 3 else ''})" if bad else
                              f"{len(missing)} arrays have no fingerprint ({', '.join(missing[:3])})")

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None,
              check_meta: Callable[[dict], None] | None = None) -> tuple[Any, dict]:
    """Checkpoint `step`, verified: (state, meta); `data_iter` (if given) is set to the saved position.

    `abstract_state`: a tree of jax.ShapeDtypeStruct with `.sharding` (the mesh to restore onto). `check_meta`
    may reject the saved config (with a ConfigError) before any array is read.

    Raises:
      DamagedCheckpoint: a part cannot be read or does not match what was recorded when it was written.
      ConfigError: the checkpoint belongs to another config (`check_meta`, or array shapes).
    """
    meta = self.restore_meta(step)
    if check_meta is not None:
      check_meta(meta)
    self._check_data_iter(step, meta)
    self._check_shapes(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    state = self._read(step, "state", ocp.args.Composite(**items))["state"]
    self._verify(step, meta, state)
    return state, meta

  def restore_params(self, step: int, abstract_model_params: Any) -> tuple[Any, dict]:
    """Only the model's params (`state.params["model"]`) of checkpoint `step`, verified, onto the shardings of
    `abstract_model_params` (jax.ShapeDtypeStruct leaves); the optimizer state is not read. Returns (params,
    meta); raises as `restore`."""
    meta = self.restore_meta(step)
    self._check_data_iter(step, meta)
    self._check_shapes(step, abstract_model_params, prefix="params/model/")
    target = {"params": {"model": abstract_model_params}}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    state = self._read(step, "state", ocp.args.Composite(state=args))["state"]
    self._verify(step, meta, state)
    return state["params"]["model"], meta

  def restore_newest_intact(self, restore: Callable[[int], T], *, move_damaged: bool) -> tuple[int, T] | None:
    """`(step, restore(step))` for the newest step whose `restore` verifies on every process; None if there is
    no checkpoint at all.

    Each damaged step gets one warning line naming it and the damage; with `move_damaged` (training) it is
    moved to `<directory>/damaged/<step>` so that the run can write that step again; `--mode eval` only skips
    it. Nothing is deleted.

    Raises:
      CheckpointError: there are checkpoints, and none is intact.
    """
    damaged = []
    for step in reversed(self.step_dirs()):
      try:
        out, reason = restore(step), None
      except DamagedCheckpoint as err:
        out, reason = None, err.reason
      if _all_processes(reason is None):
        self.intact = step
        return step, out
      reason = reason or "it cannot be read on another process"
      damaged.append(step)
      moved = self._move_aside(step) if move_damaged else None
      if jax.process_index() == 0:
        where = f"moved to {moved}" if moved else "skipped"
        print(f"warning: the checkpoint of step {step} in {self.directory} is damaged ({reason}); {where}, "
              "falling back to the previous checkpoint", file=sys.stderr, flush=True)
    self.intact = None
    if damaged:
      fix = ("they were moved to " + str(self.directory / DAMAGED) + "; rerun the same command to start from "
             "scratch" if move_damaged else "train again to write a new one")
      raise CheckpointError(f"no intact checkpoint in {self.directory}: step(s) {', '.join(map(str, damaged))} "
                            f"are damaged; {fix}")
    return None

  def _move_aside(self, step: int) -> pathlib.Path:
    target = self.directory / DAMAGED / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(exist_ok=True)
      if target.exists():
        target = target.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"big_embed_checkpoint_moved_{step}")
    self._manager.reload()
    return target


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)

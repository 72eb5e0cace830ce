"""Checkpoints: state + data iterator round trip, restore onto a different mesh, no half-written steps."""

import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_embed import checkpoint as ckpt_lib
from big_embed import losses
from big_embed import models
from big_embed.data import pipeline
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.errors import TrainingError
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import optimizer as optimizer_lib
from big_embed.train import state as state_lib
from tests import tiny


def _init_fn(cfg, vocab=40):
  kind = models.kind_of(cfg.model)
  loss_cfg = losses.resolve(cfg.loss)
  spec = losses.get(loss_cfg.name)
  return state_lib.make_init_fn(kind.build(cfg.model, vocab), kind.example_batch(cfg.model),
                                lambda: spec.init_params(loss_cfg), optimizer_lib.make_optimizer(cfg.train), cfg.seed)


def _train_iterator(cfg):
  tok = tokenizer_lib.load_tokenizer(cfg.data.data_dir)
  return iter(pipeline.make_train_dataset(cfg.data, tok, batch_size=cfg.train.batch_size,
                                          max_text_len=cfg.model.max_text_len, image_size=cfg.model.image_size,
                                          seed=cfg.seed))


def test_restore_onto_a_different_mesh_with_the_data_iterator(tmp_path, data_dir):
  cfg = tiny.tiny_config(data_dir)
  init_fn = _init_fn(cfg)
  mesh_a = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  abstract, shard_a = state_lib.state_shardings(init_fn, mesh_a, cfg.sharding_rules)
  state = state_lib.create_sharded_state(init_fn, shard_a)
  it = _train_iterator(cfg)
  for _ in range(5):
    next(it)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  ckpt.save(7, state, {"step": 7}, it)
  ckpt.wait()
  expected_next = [next(it) for _ in range(3)]

  mesh_b = mesh_lib.make_mesh({"data": 8})  # no FSDP: every parameter replicated
  _, shard_b = state_lib.state_shardings(init_fn, mesh_b, cfg.sharding_rules)
  fresh_it = _train_iterator(cfg)
  restored, meta = ckpt_lib.Checkpointer(tmp_path / "ckpt").restore(
      7, ckpt_lib.abstract_with_shardings(abstract, shard_b), fresh_it)
  assert meta["step"] == 7
  for x, y, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shard_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert x.sharding == s
  for want in expected_next:
    got = next(fresh_it)
    for key in ("image", "text"):
      np.testing.assert_array_equal(got[key], want[key])


def test_keeps_newest_and_reports_full_disk(tmp_path, monkeypatch):
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", max_to_keep=2, async_save=False)
  state = {"w": jnp.arange(4.0)}
  for step in (1, 2, 3):
    ckpt.save(step, state, {"step": step})
  ckpt.wait()
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt._manager, "save", full_disk)  # pylint: disable=protected-access
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 4 .*disk is full.*newest intact checkpoint is step 3"):
    ckpt.save(4, state, {"step": 4})
  assert ckpt.latest_step() == 3


def _numpy_fingerprint(x: np.ndarray) -> int:
  """Σ_i bits_i · (2i + 1) mod 2^32 over the array's raw bits, in NumPy (uint64 products, no overflow)."""
  bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).ravel().astype(np.uint64)
  odd = 2 * np.arange(bits.size, dtype=np.uint64) + 1
  return int(np.sum((bits * odd) % 2**32) % 2**32)


def test_fingerprints_match_numpy_on_any_sharding_and_see_one_bit():
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(16, 24)).astype(np.float32), "h": rng.normal(size=(8,)).astype(jnp.bfloat16),
          "n": np.arange(5, dtype=np.int32), "b": np.array([True, False])}
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharded = {**tree, "w": jax.device_put(tree["w"], jax.sharding.NamedSharding(mesh, P("data")))}
  got, nonfinite = ckpt_lib.fingerprints(sharded)
  assert nonfinite == []
  assert got == {k: _numpy_fingerprint(np.asarray(v)) for k, v in tree.items()}
  assert ckpt_lib.fingerprints(tree)[0] == got  # the sharding does not matter
  flipped = tree["w"].copy()
  flipped.view(np.uint32)[7, 3] ^= 1 << 30
  assert ckpt_lib.fingerprints({**tree, "w": flipped})[0]["w"] != got["w"]
  assert ckpt_lib.fingerprints({"x": np.array([1.0, np.nan], np.float32)})[1] == ["x"]


def test_a_state_with_non_finite_values_is_never_written(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=False)
  ckpt.save(1, {"w": jnp.arange(4.0)}, {"step": 1})
  with pytest.raises(TrainingError, match=r"refusing to write the checkpoint of step 2: 1 arrays hold non-finite "
                     r"values \(w\); the newest intact checkpoint is step 1"):
    ckpt.save(2, {"w": jnp.array([0.0, jnp.inf, 1.0, 2.0])}, {"step": 2})
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["1"]

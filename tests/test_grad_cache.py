"""Exact gradient caching: for every registered loss, one train step with `embed_chunk_size` equals the plain step
on the same batch (parameter updates to 1e-5 relative), with dropout on, on 8 devices (and on 1 device for one
case per model kind), with several chunks per device and a chunk size that does not divide the local batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_embed import losses
from big_embed import models
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import grad_cache
from big_embed.train import state as state_lib
from big_embed.train import step as step_lib
from tests import tiny

VOCAB = 40
LOCAL_BATCH = 5  # rows per device: chunks of 2 rows -> 3 chunks per device, the last one padded
CHUNK = 2
TEXT_LEN = 6
DROPOUT = 0.2


@dataclasses.dataclass(frozen=True)
class Case:
  recipe: str
  task: str | None = None  # the text task type (None: image-text)
  hard_negatives: int = 0  # retrieval: H hard negatives per row

  @property
  def id(self):
    return "-".join(str(x) for x in (self.recipe, self.task, self.hard_negatives and f"h{self.hard_negatives}")
                    if x)


IMAGE_TEXT = ["cosent", "dexml", "distill_disco", "distill_logit_kd", "distill_repcon", "distill_sinkd",
              "infonce_multipositive", "lightclip", "matryoshka_clip", "peg", "quickstart", "siglip", "softclip",
              "teacher_kl"]
CASES = [Case(r) for r in IMAGE_TEXT] + [
    Case("dexml_debtags", "multilabel"), Case("text_retrieval", "retrieval", 3),
    Case("piccolo2_hybrid", "retrieval", 2), Case("piccolo2_hybrid", "sts"),
    Case("piccolo2_hybrid", "classification", 3)]


def test_the_cases_cover_every_registered_loss():
  def names(cfg):
    return {cfg.name} | (names(cfg.inner) if "inner" in cfg else set())

  covered = set().union(*(names(tiny.recipe(c.recipe).loss) for c in CASES))
  assert covered == set(losses.names()), sorted(set(losses.names()) - covered)


def _config(case: Case):
  cfg = tiny.recipe(case.recipe)
  m = cfg.model
  if m.get("type", "two_tower") == "text":
    m.pretrained = ""
    m.num_layers = 1
    m.bert.update(dict(hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=16))
    m.dropout = DROPOUT
  else:
    m.update(dict(image_size=8, patch_size=4, embed_dim=16))
    for tower in (m.vision, m.text):
      tower.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32, dropout=DROPOUT, attention_dropout=DROPOUT))
  m.max_text_len = TEXT_LEN
  loss = cfg.loss
  if loss.name == "matryoshka":
    loss.dims = (4, 8, 16)
  if loss.name == "hybrid":
    loss.mrl_dims = (8, 16)
  return cfg


def _tokens(rng, *shape):
  t = rng.integers(1, VOCAB, size=shape + (TEXT_LEN,)).astype(np.int32)
  t[..., TEXT_LEN // 2:] *= rng.integers(0, 2, size=shape + (1,)).astype(np.int32)  # some padded texts
  return t


def _unit(rng, b, d):
  x = rng.normal(size=(b, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batch(case: Case, cfg, b: int, seed: int = 0) -> dict:
  """A random batch of the case's task type with the shapes and dtypes of the real streams (text_batches,
  pipeline), plus random unit teacher embeddings under every key a teacher could write."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, b // 2, size=b).astype(np.int32)  # some duplicates
  if case.task is None:
    s = cfg.model.image_size
    out = {"image": rng.integers(0, 256, size=(b, s, s, 3)).astype(np.uint8), "text": _tokens(rng, b), "ids": ids,
           "score": rng.integers(0, 2, size=b).astype(np.float32)}
    d = cfg.model.embed_dim
    out.update({key: _unit(rng, b, d) for key in ("teacher_image", "teacher_text", *cfg.teacher.outputs.values())})
    return out
  h = case.hard_negatives
  if case.task == "multilabel":
    labels = rng.integers(0, 6, size=b).astype(np.int32)
    first = np.zeros(b, bool)
    first[np.unique(labels, return_index=True)[1]] = True
    all_pos = np.stack([labels, rng.integers(-1, 6, size=b)], axis=1).astype(np.int32)
    return {"query": _tokens(rng, b), "label": _tokens(rng, b), "positive_ids": labels[:, None],
            "all_positive_ids": all_pos, "label_ids": labels, "label_valid": first}
  out = {"query": _tokens(rng, b), "key": _tokens(rng, b), "ids": ids}
  if case.task == "sts":
    out["score"] = rng.uniform(0, 5, size=b).astype(np.float32)
  if h:
    out["hard_negatives"] = _tokens(rng, b, h)
    out["hard_negative_valid"] = rng.random((b, h)) < 0.8
  return out


def _run_step(case: Case, mesh, chunk: int):
  """(params before, params after, metrics) of one step on `mesh` (SGD with learning rate 1: the update is the
  gradient, so comparing updates compares gradients without Adam's sign-like normalisation of float noise)."""
  cfg = _config(case)
  kind = models.kind_of(cfg.model)
  model = kind.build(cfg.model, VOCAB)
  loss_cfg = losses.resolve(cfg.loss)
  spec = losses.get(loss_cfg.name)
  tx = optax.sgd(1.0)
  init_fn = state_lib.make_init_fn(model, kind.example_batch(cfg.model), lambda: spec.init_params(loss_cfg), tx, 0)
  _, shardings = state_lib.state_shardings(init_fn, mesh, cfg.sharding_rules)
  state = state_lib.create_sharded_state(init_fn, shardings)
  before = jax.device_get(state.params)
  chunking = grad_cache.Chunking(mesh, chunk, kind.outputs) if chunk else None
  step = step_lib.make_train_step(model, spec.build(loss_cfg, mesh, case.task),
                                  lambda p: spec.clamp_params(loss_cfg, p), tx, lambda s: jnp.float32(1.0),
                                  chunking=chunking)
  batch = _batch(case, cfg, LOCAL_BATCH * mesh_lib.batch_size_per_shard(mesh))
  batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  new_state, metrics = jax.jit(step, donate_argnums=(0,))(state, batch)
  return before, jax.device_get(new_state.params), jax.device_get(metrics)


def _relative_update_error(before, plain, cached):
  """max over leaves of |Δ_cached − Δ_plain| / max(|Δ_plain|, 1e-3 · |Δ_plain| of the whole tree) (L2 norms):
  a leaf whose true gradient is 0 (a softmax-invariant key bias) is float32 noise on both sides."""
  d_plain = jax.tree.map(lambda a, b: np.asarray(b, np.float64) - a, before, plain)
  d_cached = jax.tree.map(lambda a, b: np.asarray(b, np.float64) - a, before, cached)
  total = np.sqrt(sum(float(np.sum(x ** 2)) for x in jax.tree.leaves(d_plain)))
  assert total > 0
  errs = jax.tree.map(lambda p, c: float(np.linalg.norm(c - p) / max(np.linalg.norm(p), 1e-3 * total)),
                      d_plain, d_cached)
  return max(jax.tree.leaves(errs)), errs


# Every case on 8 devices (the gather across devices, several chunks per device); on 1 device one case per model
# kind and task shape (the same code with a mesh of one; each case costs two step compilations, ~15 s on 2 cores).
ONE_DEVICE = ("quickstart", "text_retrieval-retrieval-h3", "piccolo2_hybrid-classification-h3")


@pytest.mark.slow
@pytest.mark.parametrize("case,devices", [(c, 8) for c in CASES] + [(c, 1) for c in CASES if c.id in ONE_DEVICE],
                         ids=lambda x: x.id if isinstance(x, Case) else str(x))
def test_cached_step_equals_the_plain_step(case, devices):
  mesh = mesh_lib.make_mesh({"data": devices}, devices=jax.devices()[:devices])
  before, plain, m_plain = _run_step(case, mesh, 0)
  _, cached, m_cached = _run_step(case, mesh, CHUNK)
  np.testing.assert_allclose(m_cached["loss"], m_plain["loss"], rtol=1e-6, atol=1e-7)
  err, errs = _relative_update_error(before, plain, cached)
  assert err <= 1e-5, {k: v for k, v in jax.tree_util.tree_flatten_with_path(errs)[0] if v > 1e-5}


@pytest.mark.slow
@pytest.mark.parametrize("case", [Case("quickstart"), Case("piccolo2_hybrid", "retrieval", 2)], ids=lambda c: c.id)
def test_cached_step_equals_the_plain_step_under_fsdp_and_tensor_parallelism(case):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  before, plain, m_plain = _run_step(case, mesh, 0)
  _, cached, m_cached = _run_step(case, mesh, CHUNK)
  np.testing.assert_allclose(m_cached["loss"], m_plain["loss"], rtol=1e-6, atol=1e-7)
  assert _relative_update_error(before, plain, cached)[0] <= 1e-5


@pytest.mark.parametrize("recipe", ["quickstart", "text_retrieval"])
def test_dropout_is_on_in_the_step_and_row_keyed(recipe):
  """The cases above train with dropout: a dropout RNG changes the embeddings; and embedding chunk by chunk with
  the rows' global ids gives what embedding the whole batch gives (the masks follow the rows)."""
  case = Case(recipe, None if recipe == "quickstart" else "retrieval", 0 if recipe == "quickstart" else 2)
  cfg = _config(case)
  kind = models.kind_of(cfg.model)
  model = kind.build(cfg.model, VOCAB)
  batch = {k: v for k, v in _batch(case, cfg, 12).items() if k in kind.outputs}
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  rngs = {"dropout": jax.random.PRNGKey(3)}
  off = model.apply({"params": params}, batch)
  on = model.apply({"params": params}, batch, rngs=rngs)
  assert all(float(jnp.max(jnp.abs(on[k] - off[k]))) > 1e-3 for k in off)
  mesh = mesh_lib.make_mesh({"data": 2}, devices=jax.devices()[:2])
  chunking = grad_cache.Chunking(mesh, 4, kind.outputs)  # 6 rows per device: chunks of 4 and 2 (+2 padded)
  chunked = jax.jit(lambda b: grad_cache.embed_in_chunks(
      lambda x, ids: model.apply({"params": params}, x, row_ids=ids, rngs=rngs), b, chunking))(batch)
  for k in on:
    np.testing.assert_allclose(chunked[k], on[k], rtol=1e-5, atol=1e-6)


def test_a_teacher_embeds_in_chunks_what_it_embeds_at_once():
  from big_embed.train import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  cfg = _config(Case("quickstart"))
  kind = models.kind_of(cfg.model)
  model = kind.build(cfg.model, VOCAB)
  batch = _batch(Case("quickstart"), cfg, 16)
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  teacher = teacher_lib.Teacher(model=model, params=params, outputs={"image": "t_image", "text": "t_text"}, step=0,
                                inputs=kind.outputs)
  mesh = mesh_lib.make_mesh({"data": 4}, devices=jax.devices()[:4])
  whole = jax.jit(teacher.annotate)(params, batch)
  chunked = jax.jit(lambda p, b: teacher.annotate(p, b, grad_cache.Chunking(mesh, 3, ("image", "text"))))(params,
                                                                                                          batch)
  assert set(chunked) == set(batch) | {"t_image", "t_text"}
  for k in ("t_image", "t_text"):
    np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_with_embed_chunk_size_logs_the_plain_runs_losses(data_dir, tmp_path):
  """The config field reaches the step: `train.embed_chunk_size` trains the tiny quickstart (dropout on) with the
  same per-step losses as the plain run, to float32 rounding."""
  import json  # pylint: disable=g-import-not-at-top
  from big_embed.train import loop  # pylint: disable=g-import-not-at-top

  def run(chunk):
    cfg = tiny.tiny_config(data_dir, steps=3)
    cfg.train.update(dict(log_every=1, checkpoint_every=3, embed_chunk_size=chunk))
    for tower in (cfg.model.vision, cfg.model.text):
      tower.dropout = DROPOUT
    workdir = tmp_path / f"chunk{chunk}"
    loop.train_and_evaluate(cfg, str(workdir))
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]

  plain, cached = run(0), run(3)
  assert len(plain) == 3
  np.testing.assert_allclose(cached, plain, rtol=2e-5)

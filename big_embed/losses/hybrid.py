"""Piccolo2 multi-task hybrid loss: one objective per task type (Huang et al. 2024, arXiv 2405.06932 §3).

Batches are task-homogeneous; the task of a batch picks the loss (all similarities are cosines):

| task (aliases)                                  | loss                                           | τ    | weight |
|-------------------------------------------------|------------------------------------------------|------|--------|
| "retrieval" ("retri_contrast", "reranking")     | InfoNCE q → [in-batch keys ; all hard negs]    | 0.01 | 1.0    |
| "sts" ("cosent", "pair_classification")         | CoSENT, λ = 20 (`pairwise`)                    | 0.05 | 0.04   |
| "classification" ("cls_contrast", "clustering") | InfoNCE over the row's own label texts only    | 0.05 | 0.2    |

Each branch is optionally averaged (or summed) over Matryoshka prefixes `mrl_dims` (Piccolo2 averages over
256, 512, …, 1792), every prefix re-normalised.

Inputs (the emb keys are config fields; the names match `infonce`):
  emb["query"]:          [B, D] queries / first texts.
  emb["key"]:            [B, D] positives (retrieval), second texts (sts), the row's label text (classification).
  emb["hard_negatives"]: retrieval: optional [B, H, D] (or [B·H, D]); every one is a negative of *every* query.
                         classification: required, the row's other label texts [B, H, D] (or [B·H, D]).
  batch["score"]:        float [B], sts only.
  batch["hard_negative_valid"]: optional bool [B, H] (False = padding among the hard negatives / label texts).
  batch["valid"]:        optional bool [B] (False = padded row).
  batch["ids"]:          optional int [B], retrieval only: another pair with the row's id is not its negative.
Outputs: the weighted loss and metrics {loss, <task>/loss (unweighted), <task>/accuracy or pair_accuracy, …},
with `d{m}/` prefixes per Matryoshka prefix.

The task is *static*: a Python str (or an int index into `TASKS`) in `batch[config.task_key]`, or
`config.task` when the batch has none. A traced array is rejected. With a jitted train step, keep the task out
of the traced batch and compile one step per task, e.g.

    steps = {task: jax.jit(lambda s, b, task=task: train_step(s, {**b, "task": task})) for task in TASKS}

(a str inside the traced function is fine). In the SPMD program the whole *global* batch has one task;
Piccolo2 under DDP could mix task types across devices within a step.

Sharding: retrieval runs on the tiled similarity engine (`engine.info_nce`) under `shard_map`;
`key_mode="local"` (default) gives Piccolo2's per-device negatives (each device's queries see its own keys and
hard negatives), "gather" / "ring" every device's. CoSENT and classification are per-row or B×B and are
plain `jnp` on the global arrays (GSPMD inserts the collectives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import matryoshka
from big_embed.losses import registry
from big_embed.losses.engine import l2_normalize
from big_embed.losses.pairwise import cosent_from_cosines, cosine

TASKS = ("retrieval", "sts", "classification")
TASK_ALIASES = {
    "retrieval": "retrieval", "retri_contrast": "retrieval", "reranking": "retrieval",
    "sts": "sts", "cosent": "sts", "pair_classification": "sts",
    "classification": "classification", "cls_contrast": "classification", "clustering": "classification",
}

# ----------------------------------------------------------------------------------------------------------
# Branches. Inputs need not be normalised (cosines); each returns (unweighted loss, metrics).


def _per_row(n, b, d, what):
  """[B, H, D] from [B, H, D] or [B·H, D] (row-major: row i's H negatives are contiguous)."""
  if n.ndim == 2:
    if n.shape[1] != d or n.shape[0] % b:
      raise ValueError(f"hybrid {what}: flat hard negatives [B·H, D] need a multiple of B={b} rows of dim {d}, "
                       f"got {n.shape}")
    n = n.reshape(b, n.shape[0] // b, d)
  if n.ndim != 3 or n.shape[0] != b or n.shape[2] != d or n.shape[1] == 0:
    raise ValueError(f"hybrid {what}: hard negatives must be [B, H, D]=[{b}, H>=1, {d}], got {n.shape}")
  return n


def _check_qk(q, k, what):
  if q.ndim != 2 or k.shape != q.shape:
    raise ValueError(f"hybrid {what}: query and key must both be [B, D], got {q.shape} and {k.shape}")


def retrieval_loss(q, k, n=None, temperature=0.01, *, n_valid=None, valid=None, ids=None, mesh=None,
                   key_mode="local", tile_size=1024):
  """Piccolo2 retrieval: q [B, D] vs [k ; every row's hard negatives]; target = the row's own key.

  Args:
    q, k: [B, D]; n: optional [B, H, D] or [B·H, D]; n_valid: optional bool [B, H]; valid: optional bool [B]
    (a padded row is neither a query nor a key, and its hard negatives are dropped); ids: optional int [B];
    mesh / key_mode / tile_size: passed to `engine.info_nce`.
  """
  _check_qk(q, k, "retrieval")
  b, d = q.shape
  flat_n = flat_valid = None
  if n is not None:
    n = _per_row(n, b, d, "retrieval")
    flat_n = n.reshape(-1, d)  # [B·H, D]: shard s holds its own rows' negatives
    if n_valid is not None and n_valid.shape != n.shape[:2]:
      raise ValueError(f"hybrid retrieval: hard_negative_valid must be [B, H]={n.shape[:2]}, got {n_valid.shape}")
    if valid is not None:  # a padded row's hard negatives are padding too
      n_valid = valid[:, None] & (True if n_valid is None else n_valid)
    if n_valid is not None:
      flat_valid = n_valid.reshape(-1)
  loss, metrics = engine.info_nce(
      q, k, flat_n, ids, temperature=temperature, mesh=mesh, key_mode=key_mode, tile_size=tile_size,
      valid=valid, hard_negatives_valid=flat_valid, normalize=True)
  return loss, {"accuracy": metrics["accuracy"]}


def classification_loss(q, k, n, temperature=0.05, *, n_valid=None, valid=None):
  """Piccolo2 classification: row i scored against [k_i, n_i1..n_iH] only (no in-batch negatives); target 0.

  Args:
    q, k: [B, D]; n: [B, H, D] or [B·H, D]; n_valid: optional bool [B, H]; valid: optional bool [B].
  """
  _check_qk(q, k, "classification")
  b, d = q.shape
  if n is None:
    raise ValueError("hybrid classification: needs the rows' other label texts (emb[config.loss.neg_tower])")
  n = _per_row(n, b, d, "classification")
  qn = l2_normalize(q)  # [B, D]
  pos = jnp.sum(qn * l2_normalize(k), axis=-1) / temperature  # [B]
  neg = jnp.einsum("bd,bhd->bh", qn, l2_normalize(n)) / temperature  # [B, H]
  if n_valid is None:
    n_valid = jnp.ones(neg.shape, bool)
  elif n_valid.shape != neg.shape:
    raise ValueError(f"hybrid classification: hard_negative_valid must be [B, H]={neg.shape}, got {n_valid.shape}")
  # −log softmax([pos, neg])_0 = softplus(LSE(neg) − pos): exact even when the positive dominates (no
  # cancellation of LSE − pos at τ = 0.05). A row without valid negatives has loss 0 (double where: no NaN).
  has_neg = jnp.any(n_valid, axis=-1)  # [B]
  neg = jnp.where(n_valid, neg, -jnp.inf)
  lse_neg = jax.nn.logsumexp(jnp.where(has_neg[:, None], neg, 0.0), axis=-1)  # [B]
  nll = jnp.where(has_neg, jax.nn.softplus(lse_neg - pos), 0.0)  # [B]
  correct = (pos > jnp.max(neg, axis=-1)).astype(jnp.float32)
  w = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  return jnp.sum(w * nll) / count, {"accuracy": jnp.sum(w * correct) / count}


def sts_loss(q, k, score, scale=20.0, *, valid=None):
  """CoSENT on (q_i, k_i, score_i); q, k [B, D], score [B]; valid optional bool [B]."""
  _check_qk(q, k, "sts")
  if score.shape != q.shape[:1]:
    raise ValueError(f"hybrid sts: score must be [B]=[{q.shape[0]}], got {score.shape}")
  return cosent_from_cosines(cosine(q, k), score, scale, valid)


def resolve_task(value) -> str:
  """A static task name or index -> one of TASKS."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError("hybrid: the batch's task must be static (a Python str or int), not a traced array; "
                     "compile one train step per task (see big_embed.losses.hybrid)")
  if isinstance(value, bytes):
    value = value.decode()
  if not isinstance(value, str):
    try:
      value = TASKS[int(value)]
    except (TypeError, ValueError, IndexError):
      raise ValueError(f"hybrid: task must be one of {sorted(TASK_ALIASES)} or an index into {TASKS}, "
                       f"got {value!r}") from None
  if value not in TASK_ALIASES:
    raise ValueError(f"hybrid: task must be one of {sorted(TASK_ALIASES)}, got {value!r}")
  return TASK_ALIASES[value]


# ----------------------------------------------------------------------------------------------------------
# Registered loss.


def _default_config():
  return dict(
      task_key="task",             # batch[task_key]: static task (str or index into TASKS)
      task="",                     # used when the batch has no task_key ("" = the batch must say)
      query_tower="query",
      key_tower="key",
      neg_tower="hard_negatives",  # optional for retrieval, required for classification
      score_key="score",
      retrieval_temperature=0.01,
      retrieval_weight=1.0,
      sts_scale=20.0,              # CoSENT λ
      sts_weight=0.04,
      cls_temperature=0.05,
      cls_weight=0.2,
      mrl_dims=(),                 # e.g. (256, 512, 768, 1024, 1280, 1536, 1792); () = full embedding only
      mrl_reduction="mean",        # Piccolo2 averages; "sum" as in MRL
      **common.engine_fields(key_mode="local"),  # retrieval: "local" = Piccolo2's per-device negatives
  )


def _validate(cfg):
  for field in ("task_key", "query_tower", "key_tower", "neg_tower", "score_key"):
    if not (isinstance(cfg[field], str) and cfg[field]):
      raise ValueError(f"config.loss.{field} must be a non-empty key, got {cfg[field]!r}")
  for field in ("retrieval_temperature", "sts_scale", "cls_temperature"):
    common.check_positive(cfg, field)
  for field in ("retrieval_weight", "sts_weight", "cls_weight"):
    common.check_range(cfg, field, lo=0.0)
  if cfg.task and cfg.task not in TASK_ALIASES:
    raise ValueError(f"config.loss.task must be '' or one of {sorted(TASK_ALIASES)}, got {cfg.task!r}")
  if tuple(cfg.mrl_dims):
    matryoshka.validate_dims(cfg.mrl_dims, cfg.mrl_reduction, "mrl_dims", "mrl_reduction")
  else:
    common.check_choice(cfg, "mrl_reduction", matryoshka.REDUCTIONS)
  common.check_engine(cfg)


def _build(cfg, mesh):
  dims = tuple(int(m) for m in cfg.mrl_dims)

  def loss_fn(emb, batch, loss_params, step):
    del loss_params, step
    if cfg.task_key in batch:
      task = resolve_task(batch[cfg.task_key])
    elif cfg.task:
      task = resolve_task(cfg.task)
    else:
      raise ValueError(f"hybrid: batch has no {cfg.task_key!r} (config.loss.task_key) and config.loss.task is ''")
    q = common.array(emb, cfg.query_tower, "emb", ndim=2)
    k = common.array(emb, cfg.key_tower, "emb")
    n = None if task == "sts" else common.array(emb, cfg.neg_tower, "emb", required=task == "classification")
    b = q.shape[:1]
    valid = common.array(batch, "valid", "batch", shape=b, required=False)
    valid = None if valid is None else valid.astype(bool)
    n_valid = common.array(batch, "hard_negative_valid", "batch", required=False)
    n_valid = None if n_valid is None or n is None else n_valid.astype(bool)

    if task == "retrieval":
      ids = common.array(batch, "ids", "batch", shape=b, required=False)
      branch = lambda q, k, n: retrieval_loss(
          q, k, n, cfg.retrieval_temperature, n_valid=n_valid, valid=valid, ids=ids, mesh=mesh,
          key_mode=cfg.key_mode, tile_size=cfg.tile_size)
      weight = cfg.retrieval_weight
    elif task == "sts":
      score = common.array(batch, cfg.score_key, "batch", shape=b)
      branch = lambda q, k, n: sts_loss(q, k, score, cfg.sts_scale, valid=valid)
      weight = cfg.sts_weight
    else:
      branch = lambda q, k, n: classification_loss(q, k, n, cfg.cls_temperature, n_valid=n_valid, valid=valid)
      weight = cfg.cls_weight

    if dims:
      arrays = {"query": q, "key": k} if n is None else {"query": q, "key": k, "hard_negatives": n}
      matryoshka.check_dims(dims, arrays, "config.loss.mrl_dims")
      cut = lambda x, m: None if x is None else matryoshka.prefix(x, m)
      raw, metrics = matryoshka.nested(lambda m: branch(cut(q, m), cut(k, m), cut(n, m)), dims,
                                       cfg.mrl_reduction)
    else:
      raw, metrics = branch(q, k, n)
    loss = weight * raw
    return loss, {"loss": loss, f"{task}/loss": raw, **{f"{task}/{name}": v for name, v in metrics.items()}}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="hybrid", build=_build, default_config=_default_config, validate=_validate))

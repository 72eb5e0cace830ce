"""Piccolo2 multi-task hybrid loss: one objective per task type (Huang et al. 2024, arXiv 2405.06932 §3).

Batches are task-homogeneous; the task of a batch picks the loss (all similarities are cosines):

| task (aliases)                                         | loss                                          | τ    | weight |
|--------------------------------------------------------|-----------------------------------------------|------|--------|
| "retrieval" ("retri_contrast", "reranking")            | InfoNCE q→[in-batch positives ; hard negatives] | 0.01 | 1.0    |
| "sts" ("cosent", "pair_classification")                | CoSENT, λ = 20 (`pairwise`)                   | 0.05 | 0.04   |
| "classification" ("cls_contrast", "clustering")        | InfoNCE over the row's own label texts only   | 0.05 | 0.2    |

Each branch is optionally averaged (or summed) over Matryoshka prefixes `mrl_dims` (Piccolo2 averages over
256, 512, …, 1792), every prefix re-normalised.

Inputs (emb keys configurable):
  emb["query"]: [B, D] queries / first texts.
  emb["pos"]:   [B, D] positives (retrieval), second texts (sts), the row's label text (classification).
  emb["neg"]:   retrieval: optional hard negatives [B·k, D] or [B, k, D], shared by all queries;
                classification: the row's other label texts [B, k, D] (or [B·k, D], split evenly per row).
  batch["score"]: float [B] gold scores (sts only).
  batch["neg_mask"]: optional bool [B, k] (classification only): False marks padding among the label texts.

The task is *static*: a Python str (or an int index into `TASKS`) in `batch[config.task_key]`, or
`config.task` when the batch has none. A traced array is rejected. With a jitted train step, keep the task
out of the traced batch and compile one step per task, e.g.

    steps = {task: jax.jit(lambda s, b, task=task: train_step(s, {**b, "task": task})) for task in TASKS}

(a str inside the traced function is fine). In the SPMD program the whole *global* batch has one task;
Piccolo2 under DDP could mix task types across devices within a step.

Sharding: the branches are plain `jnp` on the global arrays. CoSENT and classification are per-row or B×B.
Retrieval here materialises the [B_g, B_g·(1+k)] logits with global in-batch negatives (Piccolo2 uses
per-device negatives only; on one device the two agree); its single call site `_retrieval_infonce` is the
place to switch to the tiled similarity engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_embed.losses import matryoshka
from big_embed.losses import registry
from big_embed.losses.pairwise import cosent_from_cosines, cosine, l2_normalize

TASKS = ("retrieval", "sts", "classification")
TASK_ALIASES = {
    "retrieval": "retrieval", "retri_contrast": "retrieval", "reranking": "retrieval",
    "sts": "sts", "cosent": "sts", "pair_classification": "sts",
    "classification": "classification", "cls_contrast": "classification", "clustering": "classification",
}

# ----------------------------------------------------------------------------------------------------------
# Branches. Inputs need not be normalised (cosines); all return (unweighted loss, metrics).


def full_matrix_infonce(q: jax.Array, keys: jax.Array, temperature: float) -> tuple[jax.Array, dict]:
  """InfoNCE of q [B, D] against keys [N, D], N >= B, where key i is row i's positive; mean over rows."""
  logits = l2_normalize(q) @ l2_normalize(keys).T / temperature  # [B, N]
  labels = jnp.arange(q.shape[0])
  pos = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]  # [B]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - pos)
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"accuracy": acc}


def _retrieval_infonce(q, p, n, temperature):
  """q, p [B, D]; n [M, D] or None. The one call site to swap for the engine's InfoNCE-with-hard-negatives."""
  keys = p if n is None else jnp.concatenate([p, n], axis=0)  # [B + M, D]
  return full_matrix_infonce(q, keys, temperature)


def retrieval_loss(q, p, n, temperature=0.01):
  """Piccolo2 retrieval: q [B, D] vs [p ; n] with n [B·k, D], [B, k, D] or None; target = own positive."""
  if q.ndim != 2 or p.shape != q.shape:
    raise ValueError(f"hybrid retrieval: query and pos must both be [B, D], got {q.shape} and {p.shape}")
  if n is not None:
    if n.shape[-1] != q.shape[-1] or n.ndim not in (2, 3):
      raise ValueError(f"hybrid retrieval: neg must be [M, D] or [B, k, D] with D={q.shape[-1]}, got {n.shape}")
    n = n.reshape(-1, n.shape[-1])
  return _retrieval_infonce(q, p, n, temperature)


def classification_loss(q, p, n, temperature=0.05, mask=None):
  """Piccolo2 classification: row i scored against [p_i, n_i1..n_ik] only (no in-batch negatives); target 0.

  Args:
    q, p: [B, D]; n: [B, k, D] or [B·k, D]; mask: optional bool [B, k] (False = padded label text).
  """
  if q.ndim != 2 or p.shape != q.shape:
    raise ValueError(f"hybrid classification: query and pos must both be [B, D], got {q.shape} and {p.shape}")
  b, d = q.shape
  if n is None:
    raise ValueError("hybrid classification: needs the rows' negative label texts (config.neg_tower)")
  if n.ndim == 2:
    if n.shape[1] != d or n.shape[0] % b:
      raise ValueError(f"hybrid classification: flat neg [B·k, D] needs a multiple of B={b} rows of dim {d}, "
                       f"got {n.shape}")
    n = n.reshape(b, n.shape[0] // b, d)
  if n.ndim != 3 or n.shape[0] != b or n.shape[2] != d or n.shape[1] == 0:
    raise ValueError(f"hybrid classification: neg must be [B, k, D]=[{b}, k>=1, {d}], got {n.shape}")
  qn = l2_normalize(q)  # [B, D]
  pos = jnp.sum(qn * l2_normalize(p), axis=-1) / temperature  # [B]
  neg = jnp.einsum("bd,bkd->bk", qn, l2_normalize(n)) / temperature  # [B, k]
  if mask is not None:
    if mask.shape != neg.shape:
      raise ValueError(f"hybrid classification: neg_mask must be [B, k]={neg.shape}, got {mask.shape}")
    neg = jnp.where(mask, neg, -jnp.inf)  # the positive keeps every row's LSE finite
  lse = jax.nn.logsumexp(jnp.concatenate([pos[:, None], neg], axis=1), axis=-1)  # [B]
  loss = jnp.mean(lse - pos)
  acc = jnp.mean((pos > jnp.max(neg, axis=-1)).astype(jnp.float32))
  return loss, {"accuracy": acc}


def sts_loss(q, p, score, scale=20.0):
  """CoSENT on (q_i, p_i, score_i); q, p [B, D], score [B]."""
  if q.ndim != 2 or p.shape != q.shape or score.shape != q.shape[:1]:
    raise ValueError(f"hybrid sts: query, pos must be [B, D] and score [B], got {q.shape}, {p.shape}, "
                     f"{score.shape}")
  return cosent_from_cosines(cosine(q, p), score, scale)


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
      task="",                     # used when the batch has no task_key ("" = required in the batch)
      query_tower="query",
      pos_tower="pos",
      neg_tower="neg",             # optional for retrieval, required for classification
      score_key="score",
      neg_mask_key="neg_mask",     # optional, classification only
      retrieval_temperature=0.01,
      retrieval_weight=1.0,
      sts_scale=20.0,              # CoSENT λ
      sts_weight=0.04,
      cls_temperature=0.05,
      cls_weight=0.2,
      mrl_dims=(),                 # e.g. (256, 512, 768, 1024, 1280, 1536, 1792); () = full embedding only
      mrl_reduction="mean",        # Piccolo2 averages; "sum" as in MRL
  )


def _validate(cfg):
  for field in ("retrieval_temperature", "sts_scale", "cls_temperature"):
    if not cfg[field] > 0:
      raise ValueError(f"config.loss.{field} must be > 0, got {cfg[field]}")
  for field in ("retrieval_weight", "sts_weight", "cls_weight"):
    if not cfg[field] >= 0:
      raise ValueError(f"config.loss.{field} must be >= 0, got {cfg[field]}")
  if cfg.task and cfg.task not in TASK_ALIASES:
    raise ValueError(f"config.loss.task must be '' or one of {sorted(TASK_ALIASES)}, got {cfg.task!r}")
  if tuple(cfg.mrl_dims):
    matryoshka.validate_dims(cfg.mrl_dims, cfg.mrl_reduction, "mrl_dims", "mrl_reduction")
  elif cfg.mrl_reduction not in matryoshka.REDUCTIONS:
    raise ValueError(f"config.loss.mrl_reduction must be one of {matryoshka.REDUCTIONS}, "
                     f"got {cfg.mrl_reduction!r}")


def _build(cfg, mesh):
  del mesh  # plain jnp on global arrays (see module docstring)
  dims = tuple(int(m) for m in cfg.mrl_dims)

  def get(table, key, name, required=True):
    if key in table:
      return table[key]
    if required:
      raise ValueError(f"hybrid: {name} has no {key!r}; keys: {sorted(table)}")
    return None

  def loss_fn(emb, batch, loss_params, step):
    del loss_params, step
    if cfg.task_key in batch:
      task = resolve_task(batch[cfg.task_key])
    elif cfg.task:
      task = resolve_task(cfg.task)
    else:
      raise ValueError(f"hybrid: batch has no {cfg.task_key!r} (config.loss.task_key) and config.loss.task is ''")
    q = get(emb, cfg.query_tower, "emb")
    p = get(emb, cfg.pos_tower, "emb")
    n = get(emb, cfg.neg_tower, "emb", required=task == "classification")

    if task == "retrieval":
      branch = lambda q, p, n: retrieval_loss(q, p, n, cfg.retrieval_temperature)
      weight = cfg.retrieval_weight
    elif task == "sts":
      score = get(batch, cfg.score_key, "batch")
      branch = lambda q, p, n: sts_loss(q, p, score, cfg.sts_scale)
      weight = cfg.sts_weight
    else:
      mask = get(batch, cfg.neg_mask_key, "batch", required=False)
      branch = lambda q, p, n: classification_loss(q, p, n, cfg.cls_temperature, mask)
      weight = cfg.cls_weight

    if dims:
      arrays = {"query": q, "pos": p} if n is None else {"query": q, "pos": p, "neg": n}
      matryoshka.check_dims(dims, arrays, "config.loss.mrl_dims")
      cut = lambda x, m: None if x is None else matryoshka.prefix(x, m)
      raw, metrics = matryoshka.nested(lambda m: branch(cut(q, m), cut(p, m), cut(n, m)), dims,
                                       cfg.mrl_reduction)
    else:
      raw, metrics = branch(q, p, n)
    loss = weight * raw
    return loss, {"loss": loss, f"{task}/loss": raw, **{f"{task}/{k}": v for k, v in metrics.items()}}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="hybrid", build=_build, default_config=_default_config, validate=_validate))

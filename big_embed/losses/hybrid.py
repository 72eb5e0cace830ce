"""Piccolo2 multi-task hybrid loss: one objective per task type (Huang et al. 2024, arXiv 2405.06932 §3).

Batches are task-homogeneous; the task type of a run's batches (the data layer's types, static: the train step is
compiled once per type) picks the loss when it is built (`build(cfg, mesh, task)`); all similarities are cosines:

| task type        | loss                                               | config group (τ, weight) |
|------------------|----------------------------------------------------|--------------------------|
| "retrieval"      | InfoNCE q → [in-batch keys ; all hard negatives]   | `retrieval`: 0.01, 1.0   |
| "sts"            | CoSENT, λ = 1/τ = 20 (`pairwise`)                  | `sts`: 0.05, 0.04        |
| "classification" | InfoNCE over the row's own label texts only        | `classification`: 0.05, 0.2 |

e.g. `config_utils.loss("hybrid", sts=dict(weight=0.1))` changes one field of one group. Each branch is
optionally averaged (or summed) over Matryoshka prefixes `mrl_dims` (Piccolo2 averages over 256, 512, …, 1792),
every prefix re-normalised.

Inputs (the emb keys are config fields; the names match `infonce`):
  emb["query"]:          [B, D] queries / first texts.
  emb["key"]:            [B, D] positives (retrieval), second texts (sts), the row's label text (classification).
  emb["hard_negatives"]: retrieval: optional [B, H, D] (or [B·H, D]); every one is a negative of *every* query.
                         classification: required, the row's other label texts [B, H, D] (or [B·H, D]).
  batch["score"]:        float [B], sts only.
  batch["hard_negative_valid"]: optional bool [B, H] (False = padding among the hard negatives / label texts).
  batch["valid"]:        optional bool [B] (False = padded row).
  batch["ids"]:          optional int [B], retrieval only: another pair with the row's id is not its negative.
Outputs: the weighted loss and metrics {loss, <task>/loss (unweighted), <task>/accuracy (top-1 is the positive)
or sts/pair_accuracy, …}, with `d{m}/` prefixes per Matryoshka prefix. In the SPMD program the whole *global*
batch has one task; Piccolo2 under DDP could mix task types across devices within a step.

Sharding: retrieval and classification run on the tiled similarity engine (`infonce.info_nce`) under `shard_map`;
for retrieval `key_mode="local"` (default) gives Piccolo2's per-device negatives (each device's queries see its
own keys and hard negatives), "gather" / "ring" every device's; classification rows see only their own label
texts (`in_batch=False`). CoSENT needs a B×B matrix of pair cosines and is plain `jnp` on the global arrays
(GSPMD inserts the collectives).
"""

from __future__ import annotations

from big_embed.errors import ConfigError
from big_embed.losses import common
from big_embed.losses import infonce
from big_embed.losses import matryoshka
from big_embed.losses import registry
from big_embed.losses.pairwise import cosent_from_cosines, cosine

TASKS = ("retrieval", "sts", "classification")

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


def _negative_valid(n_valid, n, valid, what):
  """The hard negatives' valid mask [B, H] (None: all), with a padded row's negatives dropped too."""
  if n_valid is not None and n_valid.shape != n.shape[:2]:
    raise ValueError(f"hybrid {what}: hard_negative_valid must be [B, H]={n.shape[:2]}, got {n_valid.shape}")
  if valid is not None:  # a padded row's hard negatives are padding too
    n_valid = valid[:, None] & (True if n_valid is None else n_valid)
  return n_valid


def retrieval_loss(q, k, n=None, temperature=0.01, *, n_valid=None, valid=None, ids=None, mesh=None,
                   key_mode="local", tile_size=1024):
  """Piccolo2 retrieval: q [B, D] vs [k ; every row's hard negatives]; target = the row's own key.

  Args:
    q, k: [B, D]; n: optional [B, H, D] or [B·H, D]; n_valid: optional bool [B, H]; valid: optional bool [B]
    (a padded row is neither a query nor a key, and its hard negatives are dropped); ids: optional int [B];
    mesh / key_mode / tile_size: passed to `infonce.info_nce`.
  """
  _check_qk(q, k, "retrieval")
  b, d = q.shape
  flat_n = flat_valid = None
  if n is not None:
    n = _per_row(n, b, d, "retrieval")
    flat_n = n.reshape(-1, d)  # [B·H, D]: shard s holds its own rows' negatives
    n_valid = _negative_valid(n_valid, n, valid, "retrieval")
    flat_valid = None if n_valid is None else n_valid.reshape(-1)
  loss, metrics = infonce.info_nce(
      q, k, flat_n, ids, temperature=temperature, mesh=mesh, key_mode=key_mode, tile_size=tile_size,
      valid=valid, hard_negatives_valid=flat_valid, normalize=True)
  return loss, {"accuracy": metrics["accuracy"]}


def classification_loss(q, k, n, temperature=0.05, *, n_valid=None, valid=None, mesh=None):
  """Piccolo2 classification: row i scored against [k_i, n_i1..n_iH] only (no in-batch negatives); target k_i.

  Args:
    q, k: [B, D]; n: [B, H, D] or [B·H, D]; n_valid: optional bool [B, H]; valid: optional bool [B];
    mesh: passed to `infonce.info_nce`. A row without valid negatives has loss 0 (and counts).
  """
  _check_qk(q, k, "classification")
  b, d = q.shape
  if n is None:
    raise ValueError("hybrid classification: needs the rows' other label texts (emb[config.loss.neg_tower])")
  n = _per_row(n, b, d, "classification")
  loss, metrics = infonce.info_nce(
      q, k, temperature=temperature, mesh=mesh, in_batch=False, row_negatives=n, valid=valid,
      row_negatives_valid=_negative_valid(n_valid, n, None, "classification"), normalize=True)
  return loss, {"accuracy": metrics["accuracy"]}


def sts_loss(q, k, score, temperature=0.05, *, valid=None):
  """CoSENT on (q_i, k_i, score_i) with λ = 1/temperature; q, k [B, D], score [B]; valid optional bool [B]."""
  _check_qk(q, k, "sts")
  if score.shape != q.shape[:1]:
    raise ValueError(f"hybrid sts: score must be [B]=[{q.shape[0]}], got {score.shape}")
  return cosent_from_cosines(cosine(q, k), score, 1.0 / temperature, valid)


# ----------------------------------------------------------------------------------------------------------
# Registered loss.


def _default_config():
  return dict(
      query_tower="query",
      key_tower="key",
      neg_tower="hard_negatives",  # optional for retrieval, required for classification
      score_key="score",
      retrieval=dict(temperature=0.01, weight=1.0),
      sts=dict(temperature=0.05, weight=0.04),            # CoSENT λ = 1/τ = 20
      classification=dict(temperature=0.05, weight=0.2),
      mrl_dims=(),                 # e.g. (256, 512, 768, 1024, 1280, 1536, 1792); () = full embedding only
      mrl_reduction="mean",        # Piccolo2 averages; "sum" as in MRL
      **common.engine_fields(key_mode="local"),  # retrieval: "local" = Piccolo2's per-device negatives
  )


def _validate(cfg):
  common.check_key(cfg, "query_tower", "key_tower", "neg_tower", "score_key")
  for task in TASKS:
    with registry.nested(task):
      common.check_positive(cfg[task], "temperature")
      common.check_range(cfg[task], "weight", lo=0.0)
  if tuple(cfg.mrl_dims):
    matryoshka.validate_dims(cfg.mrl_dims, cfg.mrl_reduction, "mrl_dims", "mrl_reduction")
  else:
    common.check_choice(cfg, "mrl_reduction", matryoshka.REDUCTIONS)
  common.check_engine(cfg)


def _build(cfg, mesh, task=None):
  if task not in TASKS:
    raise ConfigError(f"the hybrid loss trains on text batches of task type {', '.join(TASKS)}; got task type "
                      f"{task!r}: set config.data.tasks to tasks of those types")
  dims = tuple(int(m) for m in cfg.mrl_dims)
  temperature, weight = cfg[task].temperature, cfg[task].weight

  def loss_fn(emb, batch, loss_params, step):
    del loss_params, step
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
      branch = lambda q, k, n: retrieval_loss(q, k, n, temperature, n_valid=n_valid, valid=valid, ids=ids,
                                              mesh=mesh, key_mode=cfg.key_mode, tile_size=cfg.tile_size)
    elif task == "sts":
      score = common.array(batch, cfg.score_key, "batch", shape=b)
      branch = lambda q, k, n: sts_loss(q, k, score, temperature, valid=valid)
    else:
      branch = lambda q, k, n: classification_loss(q, k, n, temperature, n_valid=n_valid, valid=valid, mesh=mesh)

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
    name="hybrid", build=_build, default_config=_default_config, validate=_validate, task_types=TASKS))

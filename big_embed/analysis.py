"""Reading a run back for analysis: its logged metrics, an evaluation split to embed, and what to plot of it.

What `notebooks/analyze_checkpoint.ipynb` shows, as functions (the notebook itself is plots and prose):

    from big_embed import analysis
    records = analysis.read_metrics("runs/quickstart")      # metrics.jsonl: one dict per record
    steps, loss = analysis.series(records, "train/loss")     # [T] steps, [T] values
    table = analysis.eval_table(records)                     # the evaluation records: steps x "evaluator/metric"
    loaded = analysis.load("runs/quickstart")                # the newest (or step=...) checkpoint and its config
    split = analysis.eval_split(loaded.config)               # a labelled evaluation split of the run's evaluators
    emb = analysis.embed(loaded, split)                      # float32 [N, D], unit rows
    idx, sim = analysis.nearest_neighbours(emb, [0, 1], k=5)
    xy, explained = analysis.pca(emb)                        # [N, 2] and the variance share of each axis

It reads a run the way inference does (`encode.load_run`, and the config saved with the checkpoint) and imports
nothing of `train/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from big_embed import checkpoint as ckpt_lib
from big_embed import encode
from big_embed import run as run_lib
from big_embed.data import corpora, pipeline, sources
from big_embed.data.text_records import as_text, humanize_label
from big_embed.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
EVAL_PREFIX = "eval/"
SUBSET_SEED = 0  # max_items picks the same records every time
# Evaluator types whose split `eval_split` can read, in the order it prefers them (labelled splits first).
SPLIT_TYPES = ("zero_shot", "linear_probe", "multilabel", "retrieval", "text_retrieval", "sts")
PREFIX_METRIC = re.compile(r"^(?P<metric>.+)@d(?P<dim>\d+)$")  # "recall@1@d64": recall@1 at a 64-dim prefix


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl` in file order, each {"step": int, "time": float, name: float, ...}.

  Non-finite values (written as the strings "nan", "inf") come back as floats. A truncated last line (a run still
  writing it) is left out.

  Raises:
    ConfigError: no metrics.jsonl in `workdir`, or a line before the last is not JSON.
  """
  path = pathlib.Path(workdir).expanduser() / METRICS_FILE
  if not path.is_file():
    raise ConfigError(f"{path} does not exist; point the analysis at a run's --workdir (it is written while the run "
                      "trains, and by --mode eval)")
  lines = path.read_text(encoding="utf-8").splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    try:
      raw = json.loads(line)
    except json.JSONDecodeError as err:
      if number == len(lines):
        break
      raise ConfigError(f"{path} line {number} is not a JSON record ({err}); the file is damaged") from err
    records.append({k: (v if k == "step" else float(v)) for k, v in raw.items()})
  return records


def metric_names(records: Sequence[Mapping[str, Any]], prefix: str = "") -> list[str]:
  """The metric names of `records` that start with `prefix` ("train/", "eval/"), sorted."""
  return sorted({k for r in records for k in r if k not in ("step", "time") and k.startswith(prefix)})


def series(records: Sequence[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps int64 [T], values float64 [T]) of metric `name`, by increasing step.

  A step logged twice (a run resumed after a crash replays the steps after its last checkpoint; `--mode eval`
  re-evaluates a checkpoint) keeps its last record: the one that belongs to the run as it now stands.
  """
  last = {int(r["step"]): float(r[name]) for r in records if name in r}
  steps = np.array(sorted(last), np.int64)
  return steps, np.array([last[s] for s in steps], np.float64)


@dataclasses.dataclass
class EvalTable:
  """The evaluation records over steps: `values[i, j]` is `columns[j]` ("evaluator/metric") at `steps[i]`."""

  steps: np.ndarray  # int64 [S], increasing
  columns: list[str]  # [C]
  values: np.ndarray  # float64 [S, C]; NaN where a step has no value for a column

  def column(self, name: str) -> np.ndarray:
    """float64 [S]: column `name` over the steps."""
    return self.values[:, self.columns.index(name)]

  def results(self, step: int | None = None) -> dict[str, dict[str, float]]:
    """{evaluator: {metric: value}} at `step` (None: the last step), as eval_results.json holds them.

    Raises:
      ConfigError: the table is empty or has no row at `step`.
    """
    if not len(self.steps):
      raise ConfigError("the run has no evaluation record yet (they are written every config.train.eval_every steps "
                        "and by --mode eval)")
    if step is not None and step not in self.steps:
      raise ConfigError(f"no evaluation record at step {step}; evaluated steps: {self.steps.tolist()}")
    row = self.values[-1 if step is None else int(np.flatnonzero(self.steps == step)[0])]
    out: dict[str, dict[str, float]] = {}
    for name, value in zip(self.columns, row):
      if not math.isnan(value):
        evaluator, metric = name.split("/", 1)
        out.setdefault(evaluator, {})[metric] = float(value)
    return out

  def format(self, columns: Sequence[str] | None = None, digits: int = 2) -> str:
    """A plain-text table: one row per step, one column per metric (`columns`, default all)."""
    columns = list(columns or self.columns)
    cells = [["step", *columns]]
    for step, row in zip(self.steps, self.values[:, [self.columns.index(c) for c in columns]]):
      cells.append([str(step), *("" if math.isnan(v) else f"{v:.{digits}f}" for v in row)])
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def eval_table(records: Sequence[Mapping[str, Any]]) -> EvalTable:
  """The "eval/<evaluator>/<metric>" values of `records` over steps (a step evaluated twice keeps its last record)."""
  last: dict[int, dict[str, float]] = {}
  for r in records:
    evals = {k[len(EVAL_PREFIX):]: float(v) for k, v in r.items() if k.startswith(EVAL_PREFIX)}
    if evals:
      last[int(r["step"])] = evals
  steps = sorted(last)
  columns = sorted({c for row in last.values() for c in row})
  values = np.array([[last[s].get(c, np.nan) for c in columns] for s in steps], np.float64).reshape(
      len(steps), len(columns))
  return EvalTable(np.array(steps, np.int64), columns, values)


# ----------------------------------------------------------------------------------------------------------------
# Matryoshka curves


def matryoshka_curves(results: Mapping[str, Mapping[str, float]], full_dim: int
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"evaluator/metric": (dims int64 [P], values float64 [P])} from evaluators run with `dims`.

  Such an evaluator reports "<metric>@d<dim>" for each prefix width besides "<metric>" (the full width,
  `full_dim`); metrics without prefix points are left out. Points are sorted by width.
  """
  curves: dict[str, dict[int, float]] = {}
  for evaluator, metrics in results.items():
    for name, value in metrics.items():
      match = PREFIX_METRIC.match(name)
      if match and match["metric"] in metrics:
        curve = curves.setdefault(f"{evaluator}/{match['metric']}", {full_dim: float(metrics[match["metric"]])})
        curve[int(match["dim"])] = float(value)
  return {k: (np.array(sorted(c), np.int64), np.array([c[d] for d in sorted(c)], np.float64))
          for k, c in sorted(curves.items())}


def matryoshka_dims(loss_config) -> tuple[int, ...]:
  """The prefix widths a run's loss trains (`matryoshka` dims, a hybrid loss's `mrl_dims`, or those of a wrapped
  `inner` loss); () when it trains the full width only."""
  if loss_config.get("name") == "matryoshka":
    return tuple(int(d) for d in loss_config.get("dims", ()))
  if loss_config.get("mrl_dims"):
    return tuple(int(d) for d in loss_config["mrl_dims"])
  inner = loss_config.get("inner")
  return matryoshka_dims(inner) if hasattr(inner, "get") else ()


def prefix_nn_accuracy(emb: np.ndarray, labels: np.ndarray, dims: Sequence[int]) -> np.ndarray:
  """float64 [len(dims)]: leave-one-out nearest-neighbour label accuracy (percent) of the re-normalised prefixes
  emb[:, :d] (a Matryoshka curve of an embedded labelled split). Ties go to the lower index."""
  out = []
  for d in dims:
    if not 0 < d <= emb.shape[1]:
      raise ConfigError(f"a {d}-dim prefix of {emb.shape[1]}-dim embeddings does not exist")
    neighbour, _ = nearest_neighbours(emb[:, :d], np.arange(len(emb)), k=1)
    out.append(100.0 * float(np.mean(labels[neighbour[:, 0]] == labels)))
  return np.array(out, np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Geometry


def normalise(emb: np.ndarray) -> np.ndarray:
  """float32 rows of `emb` [N, D] scaled to unit L2 norm."""
  emb = np.asarray(emb, np.float32)
  return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int = 5, exclude: Sequence[int] | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
  """The `k` gallery rows [N, D] most cosine-similar to each query row [Q, D] (ties: the lower index first).

  Returns:
    (gallery indices int64 [Q, k], cosine similarities float32 [Q, k]), best first; `exclude` [Q] (optional) names
    one gallery row per query that is never its neighbour (the query itself).
  """
  sim = normalise(queries) @ normalise(gallery).T  # [Q, N]
  if exclude is not None:
    sim[np.arange(len(sim)), np.asarray(exclude, np.int64)] = -np.inf
  k = min(k, sim.shape[1] - int(exclude is not None))
  order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(sim, order, axis=1)


def nearest_neighbours(emb: np.ndarray, queries: Sequence[int], k: int = 5, exclude_self: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
  """`top_k` of the rows `queries` (indices) of `emb` [N, D] among all its rows; with `exclude_self`, a query is not
  its own neighbour. Returns (indices int64 [Q, k], cosine similarities float32 [Q, k])."""
  queries = np.asarray(queries, np.int64)
  return top_k(np.asarray(emb)[queries], emb, k, queries if exclude_self else None)


def pca(emb: np.ndarray, components: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Principal-component projection by SVD of the centred rows.

  Returns:
    (coordinates float64 [N, components], the share of the variance on each component [components]). Each axis is
    signed so that its largest loading is positive (the same picture on every run).
  """
  x = np.asarray(emb, np.float64)
  x = x - x.mean(axis=0)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  axes = vt[:components]  # [components, D]
  axes = axes * np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])[:, None]
  variance = s ** 2
  return x @ axes.T, variance[:components] / max(float(variance.sum()), 1e-300)


def label_groups(labels: np.ndarray, names: Sequence[str], max_groups: int = 10) -> tuple[np.ndarray, list[str]]:
  """Labels to colour a plot by: every label when there are at most `max_groups`, else the `max_groups - 1` most
  frequent ones (ties: the lower label) and "other".

  Args:
    labels: int [N], indices into `names`.
    names: the label names.

  Returns:
    (group int64 [N] in [0, G), group names [G]), groups in order of first label id (the frequent ones) then "other".
  """
  labels = np.asarray(labels, np.int64)
  present, counts = np.unique(labels, return_counts=True)  # increasing label ids
  if len(present) <= max_groups:
    kept = present
  else:
    kept = np.sort(present[np.argsort(-counts, kind="stable")[:max_groups - 1]])
  group = np.full(len(labels), len(kept), np.int64)  # "other" unless kept
  for g, label in enumerate(kept):
    group[labels == label] = g
  return group, [names[int(l)] for l in kept] + (["other"] if len(kept) < len(present) else [])


# ----------------------------------------------------------------------------------------------------------------
# An evaluation split of the run's config


@dataclasses.dataclass
class EvalSplit:
  """The records of one evaluator's split, ready to embed and to show."""

  evaluator: str  # its name in config.evals
  dataset: str
  split: str
  modality: str  # what is embedded: "image" (`images`; `texts` are their captions, if any) or "text" (`texts`)
  role: str  # the role a text split's evaluator embeds its texts with ("query" or "doc"; the prefix)
  texts: list[str]  # [N] or empty
  images: np.ndarray | None = None  # uint8 [N, S, S, 3]
  labels: np.ndarray | None = None  # int64 [N], indices into label_names; None: the split has no labels
  label_names: list[str] = dataclasses.field(default_factory=list)
  prompt: str = "{}"  # a zero-shot split's first prompt template: prompt.format(label name) describes a class
  pairs: list[str] = dataclasses.field(default_factory=list)  # [N] a text split's paired texts (a retrieval query's
  # document, an sts pair's second text; embedded as documents), or empty

  def __len__(self) -> int:
    return len(self.images) if self.images is not None else len(self.texts)

  def subset(self, max_items: int) -> "EvalSplit":
    """At most `max_items` records, chosen with a fixed seed, in storage order (0 = all)."""
    n = len(self)
    if not max_items or max_items >= n:
      return self
    keep = np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:max_items])
    return dataclasses.replace(
        self, texts=[self.texts[i] for i in keep] if self.texts else [],
        images=None if self.images is None else self.images[keep],
        pairs=[self.pairs[i] for i in keep] if self.pairs else [],
        labels=None if self.labels is None else self.labels[keep])

  def describe(self, i: int) -> str:
    """Record i on one line: its label (if any) and its text (the caption of an image, if any)."""
    parts = [] if self.labels is None else [self.label_names[int(self.labels[i])]]
    if self.texts:
      parts.append(" ".join(self.texts[i].split()))  # one line: fortunes and verses hold newlines and tabs
    return " | ".join(parts) or f"#{i}"


def _field(settings, name: str, default: str) -> str:
  return settings.get(name) or default


def _texts_and_labels(settings, data_dir, corpus: corpora.Corpus, defaults: tuple[str, str], split: str,
                      multi: bool) -> tuple[list[str], np.ndarray, list[str]]:
  """(texts, int64 labels, label names) of the records with a text and a label (multi: the first label)."""
  text_field, label_field = _field(settings, "text_field", defaults[0]), _field(settings, "label_field", defaults[1])
  feature = sources.features(corpus.name, data_dir)[label_field]
  names = list(getattr(feature, "names", None) or feature.feature.names)
  texts, labels = [], []
  for r in sources.read_all(corpus.name, data_dir, split):
    text, ids = as_text(r[text_field]), np.asarray(r[label_field], np.int64).reshape(-1)
    if text and len(ids):
      texts.append(text)
      labels.append(int(ids[0]))
  return texts, np.array(labels, np.int64), ([humanize_label(n) for n in names] if multi else names)


def _read_split(name: str, settings, data_dir, image_size: int) -> EvalSplit:
  kind, dataset = settings["type"], settings.get("dataset", "")
  corpus = sources.corpus(dataset, data_dir)
  common = dict(evaluator=name, dataset=dataset)
  if kind in ("zero_shot", "retrieval"):
    split = settings.get("split", "test")
    if kind == "zero_shot":
      data = pipeline.load_zero_shot_set(dataset, data_dir, image_size=image_size, split=split)
      return EvalSplit(**common, split=split, modality="image", role="doc", texts=[], images=data["images"],
                       labels=data["labels"].astype(np.int64), label_names=data["class_names"],
                       prompt=(list(settings.get("templates", None) or data["templates"]) or ["{}"])[0])
    data = pipeline.load_retrieval_set(dataset, data_dir, image_size=image_size, split=split)
    return EvalSplit(**common, split=split, modality="image", role="doc", texts=data["captions"],
                     images=data["images"])
  if kind in ("linear_probe", "multilabel"):
    split = settings.get("test_split" if kind == "linear_probe" else "split", "test")
    defaults = corpus.probe if kind == "linear_probe" else corpus.multilabel
    texts, labels, names = _texts_and_labels(settings, data_dir, corpus, defaults, split, multi=kind == "multilabel")
    return EvalSplit(**common, split=split, modality="text", role="query", texts=texts, labels=labels,
                     label_names=names)
  split = settings.get("split", "test")
  if kind == "text_retrieval":
    fields, role = (_field(settings, "query_field", corpus.retrieval[0]),
                    _field(settings, "doc_field", corpus.retrieval[1])), "query"
  else:  # sts: the pairs
    fields, role = corpus.sts[:2], "doc"
  rows = [(as_text(r[fields[0]]), as_text(r[fields[1]])) for r in sources.read_all(dataset, data_dir, split)]
  rows = [(text, pair) for text, pair in rows if text and pair]
  return EvalSplit(**common, split=split, modality="text", role=role, texts=[t for t, _ in rows],
                   pairs=[p for _, p in rows])


def _training_splits(config, data_dir) -> dict[str, dict[str, str]]:
  """Evaluator settings standing in for a run without evaluators: for each training dataset (`config.data.mixture`,
  the datasets of `config.data.tasks`), the first of SPLIT_TYPES its corpus supports, on its test split."""
  names = list(config.data.get("mixture") or {}) + [t.dataset for t in (config.data.get("tasks") or {}).values()]
  out = {}
  for name in dict.fromkeys(names):
    corpus = sources.corpus(name, data_dir)
    spec = corpus.image_text
    supports = {"zero_shot": spec and spec.label_field, "retrieval": spec and spec.caption_field,
                "linear_probe": corpus.probe, "multilabel": corpus.multilabel, "text_retrieval": corpus.retrieval,
                "sts": corpus.sts}
    kind = next((k for k in SPLIT_TYPES if supports[k]), None)
    if kind:
      split = "test" if "test" in corpus.splits else corpus.splits[0]
      out[f"{name} ({split} split)"] = {"type": kind, "dataset": name, "split": split, "test_split": split}
  return out


def eval_split(config, data_dir: str | os.PathLike[str] | None = None, evaluator: str | None = None,
               max_items: int = 256) -> EvalSplit:
  """The split of one of the run's evaluators (`config.evals`), at most `max_items` of its records.

  Args:
    config: the run's config (`load(...).config`).
    data_dir: where the datasets are prepared; None: the run's `config.data.data_dir` (else $BIG_EMBED_DATA_DIR).
    evaluator: a name in `config.evals`; None: the first labelled one (zero_shot, linear_probe, multilabel; a
      multilabel record is labelled by its first label), else the first retrieval, text_retrieval or sts one. A run
      without evaluators gets the test split of a training dataset, read as the first of those types it supports.
    max_items: records kept (a fixed-seed sample, 0 = all).

  Raises:
    ConfigError: no such evaluator, or no split to read.
    DataError: its dataset is not prepared in `data_dir`.
  """
  evals = dict(config.get("evals") or {})
  readable = {n: s for n, s in evals.items() if s.get("type") in SPLIT_TYPES}
  if evaluator is not None and evaluator not in readable:
    raise ConfigError(f"evaluator {evaluator!r} is not one of the run's evaluators whose split can be embedded: "
                      f"{sorted(readable)}")
  data_dir = data_dir or config.data.get("data_dir") or None
  if evaluator is None:
    readable = readable or _training_splits(config, data_dir)
    if not readable:
      raise ConfigError(f"the run has no evaluator of a type whose split can be embedded ({', '.join(SPLIT_TYPES)}; "
                        f"its config.evals: {sorted(evals)}) and no training dataset with such a split")
    evaluator = min(readable, key=lambda n: SPLIT_TYPES.index(readable[n]["type"]))  # first in config order on ties
  image_size = int(config.model.get("image_size", 0) or 0)
  return _read_split(evaluator, readable[evaluator], data_dir, image_size).subset(max_items)


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint and its embeddings


@dataclasses.dataclass
class Loaded:
  """A checkpoint of a run: its step, the config saved with it, and the model loaded by `encode.load_run`."""

  workdir: pathlib.Path
  step: int
  config: ml_collections.ConfigDict  # the run's config, as saved with the checkpoint
  embedder: Any  # `encode.load_run(...)`: encode(texts, role=...) -> [N, D]; encode_images(images) for two towers


def run_config(workdir: str | os.PathLike[str], step: int) -> ml_collections.ConfigDict:
  """The config saved with checkpoint `step` of the run in `workdir` (its metadata only; no array is read)."""
  checkpointer = ckpt_lib.Checkpointer(run_lib.checkpoint_dir(workdir), async_save=False, create=False)
  try:
    return ml_collections.ConfigDict(checkpointer.restore_meta(step)["config"])
  finally:
    checkpointer.close()


def load(workdir: str | os.PathLike[str], step: int | None = None, mesh=None) -> Loaded:
  """The newest (or `step`) checkpoint of the run in `workdir`, its model restored onto `mesh` (default: every
  device on the data axis). Raises ConfigError as `run.restore_run` (no checkpoint, no such step)."""
  embedder = encode.load_run(workdir, step=step, mesh=mesh)
  return Loaded(pathlib.Path(workdir).expanduser().absolute(), int(embedder.step),
                run_config(workdir, embedder.step), embedder)


def embed(loaded: Loaded, split: EvalSplit, batch_size: int = 64, pairs: bool = False) -> np.ndarray:
  """float32 [len(split), D] unit rows: the split's images (image splits) or texts, in the split's order; with
  `pairs`, its paired texts (as documents)."""
  if pairs:
    emb = loaded.embedder.encode(split.pairs, batch_size=batch_size, show_progress_bar=False, role="doc")
  elif split.modality == "image":
    emb = loaded.embedder.encode_images(split.images, batch_size=batch_size, show_progress_bar=False)
  else:
    emb = loaded.embedder.encode(split.texts, batch_size=batch_size, show_progress_bar=False, role=split.role)
  return normalise(emb)

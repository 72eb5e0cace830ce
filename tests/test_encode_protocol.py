"""`encode.load(...)` as mteb 2.x calls it (its `EncoderProtocol`), without mteb: a DataLoader-like iterable of batch
dicts gives one row per text, prompt types pick the prefixes, bad inputs raise, similarities are cosines."""

import enum
import sys

import numpy as np
import pytest

from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError
from big_embed.models import text_embedder as te
from tests import test_export

TEXTS = [f"the {w} sat on a mat number {i}" for i, w in zip(range(999), ["cat", "dog", "big red ball"] * 333)]


class PromptType(str, enum.Enum):  # as mteb defines it
  query = "query"
  document = "document"


class DataLoader:
  """What mteb builds with `create_dataloader`: batches of columns, `len()` = the number of batches, iterable
  again and again, not indexable."""

  def __init__(self, columns: dict, batch_size: int):
    self.columns, self.batch_size = columns, batch_size

  def __len__(self):
    return -(-len(next(iter(self.columns.values()))) // self.batch_size)

  def __iter__(self):
    for start in range(0, len(self) * self.batch_size, self.batch_size):
      yield {k: v[start:start + self.batch_size] for k, v in self.columns.items()}


@pytest.fixture(scope="module")
def model():
  tokenizer = Tokenizer(test_export.word_tokenizer())
  config = test_export.text_config(query_prefix="query: ", doc_prefix="doc: ")
  module = te.build_text_model(config, tokenizer.vocab_size)
  return test_export.embedder(module, test_export.random_params(module, config), tokenizer, config)


def test_mteb_dataloader_gives_one_row_per_text(model):
  want_doc, want_query = model.encode(TEXTS, role="doc"), model.encode(TEXTS, role="query")
  assert want_doc.shape == (999, model.dim) and not np.allclose(want_doc, want_query)
  kwargs = dict(task_metadata=object(), hf_split="test", hf_subset="default")
  loader = DataLoader({"text": TEXTS, "title": [""] * 999, "body": TEXTS}, batch_size=32)
  np.testing.assert_allclose(model.encode(loader, **kwargs), want_doc, atol=1e-6)
  np.testing.assert_allclose(model.encode(loader, prompt_type=PromptType.query, **kwargs), want_query, atol=1e-6)
  np.testing.assert_allclose(model.encode(loader, prompt_type=PromptType.document, **kwargs), want_doc, atol=1e-6)
  np.testing.assert_allclose(model.encode(iter(loader), **kwargs), want_doc, atol=1e-6)  # a one-shot iterator
  # The other forms keep working: a list, a str, a NumPy array of str.
  np.testing.assert_allclose(model.encode(np.array(TEXTS[:5])), want_doc[:5], atol=1e-6)
  np.testing.assert_allclose(model.encode(TEXTS[3]), want_doc[3:4], atol=1e-6)
  assert model.encode([]).shape == (0, model.dim)


def test_wrong_inputs_raise(model):
  with pytest.raises(ConfigError, match=r"input 0 is a dict with keys \['sentences'\]"):
    model.encode(DataLoader({"sentences": TEXTS}, 32))
  with pytest.raises(ConfigError, match="batch 0's 'text' holds int values"):
    model.encode([{"text": [1, 2]}])
  with pytest.raises(ConfigError, match="input 1 is a int"):
    model.encode(["a", 3])
  with pytest.raises(ConfigError, match="prompt_type='passage_x'"):
    model.encode(["a"], prompt_type="passage_x")
  with pytest.raises(ConfigError, match="contradicts"):
    model.encode(["a"], role="doc", prompt_type=PromptType.query)
  with pytest.raises(ConfigError, match="no image tower"):
    model.encode_images(np.zeros((1, 8, 8, 3), np.uint8))


def test_similarity_and_meta(model, monkeypatch):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 7)), rng.normal(size=(3, 7))
  cos = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
  np.testing.assert_allclose(model.similarity(a, b), cos, rtol=1e-5)
  np.testing.assert_allclose(model.similarity_pairwise(a[:3], b), np.diag(cos[:3]), rtol=1e-5)
  monkeypatch.setitem(sys.modules, "mteb", None)  # not installed: no metadata, and nothing else needs it
  assert model.mteb_model_meta is None

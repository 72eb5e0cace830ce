"""Human-graded similarity pairs from the test data of the gensim wheel: the shared reader and TFDS builder.

The STS sets `lee50`, `wordsim353` and `simlex999` (one module each) are read from the test data inside the pinned
wheel gensim==4.4.0, fetched at prepare time with `python -m pip download --no-deps gensim==4.4.0` (pip is the only
fetch; gensim is neither imported nor installed; the wheel's SHA-256 is checked) and read from the zip.

Licence: gensim and its test data are distributed under the GNU LGPL 2.1 (the wheel's COPYING); the data sets state
no licence of their own and are published by their authors for research evaluation: cite the papers named in each
set's module.

Records: pairs with an empty text or a line that is not UTF-8 are skipped. Scores keep each set's own scale.
Features: `text_a` Text, `text_b` Text, `score` float32. Splits: `test` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from big_embed.data.corpora import registry
from big_embed.data.errors import DataError
from big_embed.data.text_corpus import SkipCounts, decode_utf8

GENSIM_VERSION = "4.4.0"
# The one manylinux CPython 3.11 wheel, whatever the local platform (the test data is the same in all).
PIP_DOWNLOAD_ARGS = ("download", "--no-deps", "--only-binary=:all:", "--platform",
                     "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                     "--abi", "cp311", f"gensim=={GENSIM_VERSION}")
WHEEL_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
TEST_DATA = "gensim/test/test_data/"


@dataclasses.dataclass(frozen=True)
class Pair:
  """One graded pair."""
  text_a: str
  text_b: str
  score: float


def read_word_pairs(data: bytes, where: str) -> tuple[list[Pair], SkipCounts]:
  """Parses "word1<TAB>word2<TAB>score" lines ("#" lines are comments) into pairs.

  Raises:
    DataError: a line does not have three tab-separated fields or its score is not a number.
  """
  skips, out = SkipCounts(), []
  for number, raw in enumerate(data.split(b"\n"), start=1):
    if not raw.strip() or raw.lstrip().startswith(b"#"):
      continue
    line = decode_utf8(raw, skips)
    if line is None:
      continue
    fields = line.rstrip("\r").split("\t")
    try:
      if len(fields) < 3:
        raise ValueError(f"expected word1<TAB>word2<TAB>score, got {len(fields)} field(s)")
      score = float(fields[2])
    except ValueError as e:
      raise DataError(f"Malformed similarity line {where}:{number} ({e}): {line[:80]!r}") from e
    a, b = fields[0].strip(), fields[1].strip()
    if not a or not b:
      skips.empty += 1
      continue
    out.append(Pair(a, b, score))
  return out, skips


def read_lee(corpus: bytes, matrix: bytes, where: str = "lee") -> tuple[list[Pair], SkipCounts]:
  """Builds the Lee document pairs i < j from the corpus (one Latin-1 document a line) and the
  whitespace-separated N x N similarity matrix (upper triangle used).

  Raises:
    DataError: the matrix is not square numbers, or its size differs from the document count.
  """
  docs = [line.strip() for line in corpus.decode("latin-1").split("\n")]
  while docs and not docs[-1]:
    docs.pop()  # The final newline.
  try:
    rows = [[float(x) for x in line.split()] for line in matrix.decode("ascii").splitlines()
            if line.strip()]
    sims = np.asarray(rows, dtype=np.float64)
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{where}: the similarity matrix is not a table of numbers ({e})") from e
  if sims.ndim != 2 or sims.shape != (len(docs), len(docs)):
    raise DataError(f"{where}: the similarity matrix has shape {sims.shape}, expected "
                    f"({len(docs)}, {len(docs)}) for {len(docs)} documents")
  skips, out = SkipCounts(), []
  for i in range(len(docs)):
    for j in range(i + 1, len(docs)):
      if not docs[i] or not docs[j]:
        skips.empty += 1
        continue
      out.append(Pair(docs[i], docs[j], float(sims[i, j])))
  return out, skips


def download_wheel(dest: pathlib.Path) -> pathlib.Path:
  """Downloads the pinned gensim wheel into `dest` with pip; returns its path.

  Raises:
    DataError: pip fails, or the file is not the pinned wheel (SHA-256 mismatch).
  """
  cmd = [sys.executable, "-m", "pip", *PIP_DOWNLOAD_ARGS, "-d", str(dest), "--quiet"]
  print(f"similarity sets: downloading the gensim {GENSIM_VERSION} wheel (its test data): "
        f"{' '.join(cmd)}", flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = sorted(dest.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
  if proc.returncode != 0 or not wheels:
    detail = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
    raise DataError(f"Cannot download the gensim {GENSIM_VERSION} wheel, which holds the similarity "
                    f"test sets ({detail}). It needs access to the Python package index; run by "
                    f"hand: {' '.join(cmd)}")
  digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
  if digest != WHEEL_SHA256:
    raise DataError(f"{wheels[0]} has SHA-256 {digest}, not the pinned {WHEEL_SHA256}; delete it "
                    f"(and pip's cache: python -m pip cache purge) and prepare again")
  return wheels[0]


def read_wheel_member(wheel: pathlib.Path, name: str) -> bytes:
  """Returns the bytes of `gensim/test/test_data/<name>` in the wheel."""
  try:
    with zipfile.ZipFile(wheel) as zf:
      return zf.read(TEST_DATA + name)
  except (KeyError, zipfile.BadZipFile, OSError) as e:
    raise DataError(f"Cannot read {TEST_DATA}{name} from {wheel} ({e})") from e


class GradedPairsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A graded-pairs set from the gensim wheel (test split only); a subclass reads its pairs (`read_pairs`)."""

  SET_NAME = ""
  DESCRIPTION = ""
  HOMEPAGE = ""
  skip_counts: SkipCounts | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "text_a": tfds.features.Text(),
            "text_b": tfds.features.Text(),
            "score": tfds.features.Scalar(dtype=np.float32),
        }),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    with tempfile.TemporaryDirectory(prefix="big_embed_gensim_") as tmp:
      pairs, self.skip_counts = self.read_pairs(download_wheel(pathlib.Path(tmp)))
    if not pairs:
      raise DataError(f"{self.SET_NAME}: no pair could be read from the gensim wheel")
    return {"test": self._generate_examples(pairs)}

  def read_pairs(self, wheel: pathlib.Path) -> tuple[list[Pair], SkipCounts]:
    """The set's pairs, read from the gensim wheel at `wheel`."""
    raise NotImplementedError

  def _generate_examples(self, pairs):
    for i, p in enumerate(pairs):
      yield i, {"text_a": p.text_a, "text_b": p.text_b, "score": np.float32(p.score)}


class WordPairsBuilder(GradedPairsBuilder, skip_registration=True):
  """A set of "word1<TAB>word2<TAB>score" lines: the wheel's test-data file FILE (`read_word_pairs`)."""

  FILE = ""

  def read_pairs(self, wheel: pathlib.Path) -> tuple[list[Pair], SkipCounts]:
    return read_word_pairs(read_wheel_member(wheel, self.FILE), f"{wheel}:{TEST_DATA}{self.FILE}")


def register_graded_pairs(builder: type[GradedPairsBuilder]) -> registry.Corpus:
  """Registers the STS set `builder.SET_NAME` (fields text_a, text_b, score; test split only)."""
  return registry.register(registry.Corpus(
      name=builder.SET_NAME, builder=builder, kind="text", splits=("test",),
      fields={"text_a": "text", "text_b": "text", "score": "float"}, sts=("text_a", "text_b", "score")))

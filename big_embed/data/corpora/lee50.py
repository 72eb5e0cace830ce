"""Lee-50: pairs of 50 news documents with mean human similarity, an STS set (gensim's test data, as TFDS).

Files of the gensim wheel (`gensim_pairs`): `gensim/test/test_data/lee.cor` (50 news documents of the Australian
Broadcasting Corporation, one per line, Latin-1) and `similarities0-1.txt` (their 50x50 mean human similarity
matrix, scale 0-1; the upper triangle is used). Lee, Pincombe & Welsh, "An empirical evaluation of models of text
document similarity", CogSci 2005.

Records: the 1,225 document pairs i < j (text_a = document i, text_b = document j).
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from big_embed.data.corpora import gensim_pairs

CORPUS, MATRIX = "lee.cor", "similarities0-1.txt"


class Lee50Builder(gensim_pairs.GradedPairsBuilder, skip_registration=True):
  name = "big_embed_lee50"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Lee et al. (2005) 50 documents: 1,225 pairs, human similarity 0-1."}
  SET_NAME = "lee50"
  DESCRIPTION = "Lee-50: pairs of 50 ABC news documents with mean human similarity (0-1)."
  HOMEPAGE = "https://github.com/piskvorky/gensim/tree/develop/gensim/test/test_data"

  def read_pairs(self, wheel: pathlib.Path):
    return gensim_pairs.read_lee(gensim_pairs.read_wheel_member(wheel, CORPUS),
                                 gensim_pairs.read_wheel_member(wheel, MATRIX), f"{wheel}:{gensim_pairs.TEST_DATA}")


gensim_pairs.register_graded_pairs(Lee50Builder)

"""WordSim-353: English word pairs with mean human relatedness (0-10), an STS set (gensim's test data, as TFDS).

File of the gensim wheel (`gensim_pairs`): `gensim/test/test_data/wordsim353.tsv`, one "word1<TAB>word2<TAB>score"
record per line ("#" lines are comments; money/cash is listed twice). Finkelstein et al., "Placing search in
context: the concept revisited", ACM TOIS 2002.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from big_embed.data.corpora import gensim_pairs


class WordSim353Builder(gensim_pairs.WordPairsBuilder, skip_registration=True):
  name = "big_embed_wordsim353"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "WordSim-353 word pairs with mean human relatedness (0-10)."}
  SET_NAME = "wordsim353"
  DESCRIPTION = "WordSim-353: 353 English word pairs with mean human relatedness (0-10)."
  FILE = "wordsim353.tsv"
  HOMEPAGE = "http://www.cs.technion.ac.il/~gabr/resources/data/wordsim353/"


gensim_pairs.register_graded_pairs(WordSim353Builder)

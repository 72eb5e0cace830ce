"""SimLex-999: English word pairs with mean human similarity (0-10), an STS set (gensim's test data, as TFDS).

File of the gensim wheel (`gensim_pairs`): `gensim/test/test_data/simlex999.txt`, one "word1<TAB>word2<TAB>score"
record per line ("#" lines are comments). Hill, Reichart & Korhonen, "SimLex-999: evaluating semantic models with
(genuine) similarity estimation", Computational Linguistics 2015.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from big_embed.data.corpora import gensim_pairs


class SimLex999Builder(gensim_pairs.WordPairsBuilder, skip_registration=True):
  name = "big_embed_simlex999"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "SimLex-999 word pairs with mean human similarity (0-10)."}
  SET_NAME = "simlex999"
  DESCRIPTION = "SimLex-999: 999 English word pairs with mean human similarity (0-10)."
  FILE = "simlex999.txt"
  HOMEPAGE = "https://fh295.github.io/simlex.html"


gensim_pairs.register_graded_pairs(SimLex999Builder)

"""Data layer: prepared TFDS datasets (array_record), the tokenizer and Grain input pipelines.

    corpora/         every dataset, one module each, and the corpus registry (`corpora.get(name)`)
    build, prepare   build corpora into the data directory (`python -m big_embed.data.prepare NAME ...`)
    sources          prepared datasets by name: open a split, read its records or features
    own_files, own_dataset   `prepare files`: a dataset of your own .jsonl/.tsv/.csv (roles, checks, the build)
    found_datasets   the datasets found by name in a data dir (`prepare files` builds, your own TFDS datasets)
    pipeline         the image-text training stream and the image evaluation sets
    text_tasks       `config.data.tasks` resolved into TaskSpecs and checked (`validate_tasks`)
    text_stream      the multi-task text training stream; text_batches: each task type's batches
    text_records     fields as texts, label texts, stable text ids, whole columns of a split
    mined_negatives  the mined hard-negative sets
    tokenizer        the project's WordPiece tokenizer (`load_tokenizer(data_dir)`)

This module stays light (no TFDS/Grain import).
"""

from big_embed.data.errors import DataError, prepare_command
from big_embed.data.paths import resolve_data_dir

__all__ = ["DataError", "prepare_command", "resolve_data_dir"]

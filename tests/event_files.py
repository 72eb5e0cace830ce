"""Reads TensorBoard event files the way TensorBoard does, without TensorFlow: TFRecord framing (length, crc,
event, crc) around `Event` protos."""

import pathlib
import struct
from collections.abc import Iterator

from tensorboardX.proto import event_pb2


def scalars(path: pathlib.Path) -> Iterator[tuple[int, str, float]]:
  """(step, tag, value) of every scalar summary in the event file `path`, in file order."""
  data, pos = pathlib.Path(path).read_bytes(), 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    for value in event.summary.value:
      yield event.step, value.tag, value.simple_value

"""`python -m big_embed.main`, with this process reaching its first training step 40 s after the others.

The late compile of a loaded host, made certain: the training loop must hold the others at a barrier, or their
first collective's Gloo rendezvous (a fixed 30 s) fails (tests/reliability/test_cluster.py).
"""

import runpy
import sys
import time

from big_embed.train import compiled_step

LATE_S = 40
_compile = compiled_step.TrainStep.executable
_late = set()


def _late_executable(self, batch, task=None):
  executable = _compile(self, batch, task)
  if id(executable) not in _late:
    _late.add(id(executable))
    time.sleep(LATE_S)
  return executable


if __name__ == "__main__":
  compiled_step.TrainStep.executable = _late_executable
  sys.argv[0] = "big_embed.main"
  runpy.run_module("big_embed.main", run_name="__main__")

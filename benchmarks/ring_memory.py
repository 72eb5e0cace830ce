"""Per-device compiled memory of the CLIP loss's forward+backward with the keys all-gathered or passed round a ring.

    python benchmarks/ring_memory.py     # N = 65,536, d = 512, 8 devices, tiles 256,512,1024, gather and ring
    python benchmarks/ring_memory.py --sizes 16384 --devices 1,2,4,8 --tile_sizes 512
    python benchmarks/ring_memory.py --sizes 2048 --d 64 --check   # also run both modes: loss, gradient gap

The script gives JAX 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) before importing it.
For each (key_mode, N, d, tile_size, devices) it builds the CLIP loss (`config_utils.loss("clip", key_mode=…,
tile_size=…)`, resolved) on a mesh of the first `devices` devices, jits `jax.value_and_grad` of it w.r.t. the two
towers' embeddings [N, d] (sharded over the batch axes) and the loss params (the learnable temperature), and
lowers and compiles it on abstract inputs (`jax.ShapeDtypeStruct` with shardings): nothing runs, nothing is
allocated. One JSON line per configuration, with XLA's `memory_analysis()` of the compiled per-device program:

  {"key_mode": "ring", "n": 65536, "d": 512, "tile_size": 512, "devices": 8, "temp_mib": …, "argument_mib": …,
   "output_mib": …, "compile_s": …}

With `--check` each configuration also runs once on random unit embeddings (seed 0) and adds the loss and, for
ring, the largest absolute difference of its gradients from gather's at the same (N, d, tile_size, devices)
(keep N small: the step costs O(N²·d) on the CPU).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from big_embed import config_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from big_embed import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from big_embed.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

MIB = 2**20


def clip_step(key_mode: str, tile_size: int, devices: int):
  """(jitted value_and_grad of the CLIP loss w.r.t. (emb, params), its mesh, the initial loss params)."""
  cfg = losses.resolve(config_utils.loss("clip", key_mode=key_mode, tile_size=tile_size))
  spec = losses.get(cfg.name)
  mesh = mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:devices])
  loss_fn = spec.build(cfg, mesh)

  def loss(emb, params):
    return loss_fn(emb, {}, params, jnp.int32(0))[0]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), mesh, spec.init_params(cfg)


def measure(key_mode: str, n: int, d: int, tile_size: int, devices: int) -> tuple[dict, object]:
  """(the JSON row of one configuration, its compiled step)."""
  step, mesh, params = clip_step(key_mode, tile_size, devices)
  emb = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=mesh_lib.batch_sharding(mesh, 2))
  abstract_params = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=mesh_lib.replicated(mesh)), params)
  start = time.perf_counter()
  compiled = step.lower({"image": emb, "text": emb}, abstract_params).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  row = {"key_mode": key_mode, "n": n, "d": d, "tile_size": tile_size, "devices": devices,
         "temp_mib": round(mem.temp_size_in_bytes / MIB, 2),
         "argument_mib": round(mem.argument_size_in_bytes / MIB, 2),
         "output_mib": round(mem.output_size_in_bytes / MIB, 2), "compile_s": round(seconds, 1)}
  return row, (compiled, mesh, params)


def run_once(compiled, mesh, params, n: int, d: int):
  """(loss, gradients as NumPy) of one step on random unit embeddings (seed 0)."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, n, d)).astype(np.float32)
  b = a + 1.5 * b
  sharding = mesh_lib.batch_sharding(mesh, 2)
  emb = {name: jax.device_put(x / np.linalg.norm(x, axis=1, keepdims=True), sharding)
         for name, x in (("image", a), ("text", b))}
  loss, grads = compiled(emb, jax.device_put(params, mesh_lib.replicated(mesh)))
  return float(loss), jax.tree.map(np.asarray, jax.device_get(grads))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="65536", help="global batch sizes N (comma-separated)")
  p.add_argument("--d", type=int, default=512)
  p.add_argument("--tile_sizes", default="256,512,1024")
  p.add_argument("--devices", default="8", help="device counts (comma-separated, each at most 8)")
  p.add_argument("--key_modes", default="gather,ring")
  p.add_argument("--check", action="store_true", help="also run each step once and compare ring with gather")
  args = p.parse_args()
  ints = lambda s: [int(x) for x in s.split(",")]
  for n in ints(args.sizes):
    for tile in ints(args.tile_sizes):
      for devices in ints(args.devices):
        reference = None
        for key_mode in args.key_modes.split(","):
          row, (compiled, mesh, params) = measure(key_mode, n, args.d, tile, devices)
          if args.check:
            row["loss"], grads = run_once(compiled, mesh, params, n, args.d)
            if reference is None:
              reference = grads
            else:
              gaps = jax.tree.map(lambda g, r: float(np.max(np.abs(g - r))), grads, reference)
              row["max_grad_gap"] = max(jax.tree.leaves(gaps))
          print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()

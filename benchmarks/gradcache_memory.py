"""Peak memory and time of one train step, with and without exact gradient caching (`train.embed_chunk_size`).

    python benchmarks/gradcache_memory.py                          # W1, batch 512 … 4,096, plain and cached
    python benchmarks/gradcache_memory.py --batches 2048 --chunk 256 --modes cached
    python benchmarks/gradcache_memory.py --workload text_small --batches 65536 --chunk 2048 --modes cached

Workloads (random inputs, AdamW, one device):
  W1          CLIP loss; ViT image 64, patch 8, width 256, depth 6, heads 4, MLP 1024; text Transformer width 256,
              depth 6, heads 4, MLP 1024, context 32, vocabulary 49,408; embedding 256.
  text_small  CLIP loss (symmetric InfoNCE) on query-key text pairs, one shared small text tower (BERT width
              128, 2 layers, 2 heads, MLP 512, context 32, vocabulary 30,522), embedding 128.

Each (batch, mode) runs in a fresh subprocess (so peak RSS is its own). The child lowers and compiles the step
ahead of time (`compile_s`), reads XLA's buffer sizes (`memory_analysis()`), and runs the step only if they fit
in `--mem_cap_gib` (else a JSON line with "error"); it runs under RLIMIT_AS = cap + headroom. Then `--iters`
timed steps (the compile is already done, so the first step is timed too; `--iters 0`: compile only). One
JSON line per run:

  {"workload": "W1", "mode": "cached", "batch": 4096, "chunk": 128, "params_m": …, "compile_s": …,
   "xla_temp_gib": …, "xla_total_gib": …, "peak_rss_gib": …, "seconds_per_step": …, "loss": …}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import harness

GIB = 2**30


def _config(workload: str):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from big_embed import config_schema  # pylint: disable=g-import-not-at-top
  from big_embed import config_utils as cu  # pylint: disable=g-import-not-at-top
  if workload == "W1":
    c = config_schema.base_config("two_tower")
    c.model.update(dict(image_size=64, patch_size=8, max_text_len=32, embed_dim=256))
    tower = dict(width=256, depth=6, num_heads=4, mlp_dim=1024)
    c.model.vision.update(tower)
    c.model.text.update(tower)
    c.loss = cu.loss("clip")
    return c, 49408
  if workload == "text_small":
    c = config_schema.base_config("text")
    c.model.update(dict(max_text_len=32, num_layers=2))
    c.model.bert.update(dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512))
    c.loss = cu.loss("clip", towers=("query", "key"))
    return c, 30522
  raise SystemExit(f"unknown workload {workload!r}")


def _child(args):
  harness.cap_address_space(args)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  cfg, vocab = _config(args.workload)
  from big_embed import losses  # pylint: disable=g-import-not-at-top
  from big_embed import models  # pylint: disable=g-import-not-at-top
  from big_embed.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import grad_cache  # pylint: disable=g-import-not-at-top
  from big_embed.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg.model.dtype = args.dtype
  cfg.loss.tile_size = args.tile_size
  cfg.train.batch_size = args.batch
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  kind = models.kind_of(cfg.model)
  model = kind.build(cfg.model, vocab)
  loss_cfg = losses.resolve(cfg.loss)
  spec = losses.get(loss_cfg.name)
  tx = optimizer_lib.make_optimizer(cfg.train)
  init_fn = state_lib.make_init_fn(model, kind.example_batch(cfg.model), lambda: spec.init_params(loss_cfg), tx, 0)
  abstract, shardings = state_lib.state_shardings(init_fn, mesh, cfg.sharding_rules)
  chunking = grad_cache.Chunking(mesh, args.chunk, kind.outputs) if args.mode == "cached" else None
  step = step_lib.make_train_step(model, spec.build(loss_cfg, mesh), lambda p: spec.clamp_params(loss_cfg, p), tx,
                                  optimizer_lib.learning_rate_schedule(cfg.train), chunking=chunking)
  b, length = args.batch, cfg.model.max_text_len
  if args.workload == "W1":
    s = cfg.model.image_size
    shapes = {"image": ((b, s, s, 3), np.uint8), "text": ((b, length), np.int32)}
  else:
    shapes = {"query": ((b, length), np.int32), "key": ((b, length), np.int32)}
  batch_spec = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(mesh, len(shape)))
                for k, (shape, dtype) in shapes.items()}
  state_spec = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params["model"]))
  out = {"workload": args.workload, "mode": args.mode, "dtype": args.dtype, "batch": b,
         "chunk": args.chunk if chunking else None, "tile_size": args.tile_size, "params_m": round(n_params / 1e6, 2)}
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state_spec, batch_spec).compile()
  out["compile_s"] = round(time.perf_counter() - t, 1)
  mem = compiled.memory_analysis()
  need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  out["xla_temp_gib"] = round(mem.temp_size_in_bytes / GIB, 3)
  out["xla_total_gib"] = round(need / GIB, 3)
  if need > args.mem_cap_gib * GIB:
    out["error"] = f"needs {need / GIB:.1f} GiB of XLA buffers > cap {args.mem_cap_gib} GiB; not run"
    print(json.dumps(out), flush=True)
    return
  if not args.iters:  # compile and memory only
    print(json.dumps(out), flush=True)
    return
  print(json.dumps({**out, "status": "compiled"}), flush=True)  # the parent reports this line if we die

  state = state_lib.create_sharded_state(init_fn, shardings)
  rng = np.random.default_rng(0)
  batch = {}
  for k, (shape, dtype) in shapes.items():
    x = rng.integers(0, 256, size=shape) if dtype == np.uint8 else rng.integers(1, vocab, size=shape)
    batch[k] = jax.device_put(x.astype(dtype), batch_spec[k].sharding)
  times = []
  for _ in range(args.iters):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  out["seconds_per_step"] = round(min(times), 2)
  out["iters"] = args.iters
  out["loss"] = round(float(metrics["loss"]), 5)
  out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
  print(json.dumps(out), flush=True)


def _parent(args):
  for batch in [int(s) for s in args.batches.split(",")]:
    for mode in args.modes.split(","):
      cmd = [os.path.abspath(__file__), "--child", "--workload", args.workload, "--mode", mode, "--batch",
             str(batch), "--chunk", str(args.chunk), "--tile_size", str(args.tile_size), "--dtype", args.dtype,
             "--iters", str(args.iters), "--mem_cap_gib", str(args.mem_cap_gib), "--headroom_gib",
             str(args.headroom_gib)]
      harness.run_child(cmd, {"workload": args.workload, "mode": mode, "batch": batch}, args.timeout_s)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", default="W1", choices=("W1", "text_small"))
  p.add_argument("--batches", default="512,1024,2048,4096")
  p.add_argument("--modes", default="plain,cached")
  p.add_argument("--chunk", type=int, default=128, help="cached: rows per device per chunk")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--tile_size", type=int, default=1024, help="the loss's key tile (config.loss.tile_size)")
  p.add_argument("--iters", type=int, default=1,
                 help="timed steps (the compile is done ahead of time); 0: compile and report memory only")
  harness.add_cap_flags(p, mem_cap_gib=16.0)
  p.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, default=512, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
  else:
    _parent(args)


if __name__ == "__main__":
  main()

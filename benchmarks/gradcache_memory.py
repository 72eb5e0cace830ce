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
import time

import harness

GIB = 2**30


def _child(args):
  harness.cap_address_space(args)
  import jax  # pylint: disable=g-import-not-at-top

  cached = args.mode == "cached"
  setup = harness.train_setup(args.workload, args.batch, args.dtype, args.tile_size, args.chunk if cached else 0)
  from big_embed.train import state as state_lib  # pylint: disable=g-import-not-at-top
  out = {"workload": args.workload, "mode": args.mode, "dtype": args.dtype, "batch": args.batch,
         "chunk": args.chunk if cached else None, "tile_size": args.tile_size,
         "params_m": round(setup.n_params / 1e6, 2)}
  t = time.perf_counter()
  compiled = jax.jit(setup.step, donate_argnums=(0,)).lower(setup.state_spec, setup.batch_spec).compile()
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

  state = state_lib.create_sharded_state(setup.init_fn, setup.shardings)
  batch = harness.random_batch(setup)
  held = {"state": state}

  def run():
    held["state"], held["metrics"] = compiled(held["state"], batch)
    jax.block_until_ready(held["metrics"])

  timing = harness.time_runs(run, args.iters - 1)  # every step timed, the first one too
  metrics = held["metrics"]
  out["seconds_per_step"] = round(min([timing["first_call_s"], *timing["seconds_all"]]), 2)
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
  (_child if args.child else _parent)(args)


if __name__ == "__main__":
  main()

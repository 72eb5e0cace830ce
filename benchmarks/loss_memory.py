"""Peak memory and time of one InfoNCE forward+backward: the tiled similarity engine vs the naive N×N matrix.

    python benchmarks/loss_memory.py                       # N ∈ {4096, …, 65536}, d = 512, both impls
    python benchmarks/loss_memory.py --sizes 4096,8192 --impls tiled --tile_size 256

Each (impl, N) runs in a fresh subprocess (so peak RSS is its own) under a memory cap: the child sets
RLIMIT_AS to `--mem_cap_gib` plus headroom and, before running, compares XLA's compiled buffer sizes
(`memory_analysis()`: arguments + outputs + temporaries) with the cap; an impl that does not fit is reported
as a JSON line with "error" instead of being run. One JSON line per run on stdout:

  {"impl": "tiled", "n": 16384, "d": 512, "tile_size": 512, "compiled_temp_gib": …, "peak_rss_gib": …,
   "first_call_s": …, "seconds_per_step": …, "iters": …, "loss": …}

Loss: one-directional InfoNCE of N unit queries against N unit keys (key i is query i's positive), scale 20,
on one device; the step is `jax.value_and_grad` w.r.t. both. The first call (compile + run) is the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import harness

GIB = 2**30


def _child(args):
  harness.cap_address_space(args)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from big_embed.losses import infonce  # pylint: disable=g-import-not-at-top
  from big_embed.ops import l2_normalize  # pylint: disable=g-import-not-at-top

  n, d, scale = args.n, args.d, 20.0

  def tiled(q, k):
    return infonce.info_nce(q, k, scale=scale, tile_size=args.tile_size)[0]

  def naive(q, k):
    logits = scale * q @ k.T  # [N, N]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

  out = {"impl": args.impl, "n": n, "d": d, "tile_size": args.tile_size if args.impl == "tiled" else None}
  step = jax.jit(jax.value_and_grad(tiled if args.impl == "tiled" else naive, argnums=(0, 1)))
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
  compiled = step.lower(spec, spec).compile()
  mem = compiled.memory_analysis()
  need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  out["compiled_temp_gib"] = round(mem.temp_size_in_bytes / GIB, 3)
  out["compiled_total_gib"] = round(need / GIB, 3)
  if need > args.mem_cap_gib * GIB:
    out["error"] = (f"needs {need / GIB:.1f} GiB of XLA buffers (temp {mem.temp_size_in_bytes / GIB:.1f} GiB) "
                    f"> cap {args.mem_cap_gib} GiB; not run")
    print(json.dumps(out), flush=True)
    return
  print(json.dumps({**out, "status": "compiled"}), flush=True)  # the parent reports this line if we die

  @jax.jit
  def make(key):
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (n, d), jnp.float32)
    k = q + 1.5 * jax.random.normal(kk, (n, d), jnp.float32)
    return l2_normalize(q), l2_normalize(k)

  q, k = make(jax.random.PRNGKey(0))
  held = {}

  def run():
    held["loss"], held["grads"] = compiled(q, k)
    jax.block_until_ready(held["grads"])

  timing = harness.time_runs(run, args.iters)
  loss = held["loss"]
  out["first_call_s"] = round(timing["first_call_s"], 2)
  out["seconds_per_step"] = round(sum(timing["seconds_all"]) / args.iters, 3)
  out["iters"] = args.iters
  out["loss"] = round(float(loss), 5)
  out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
  print(json.dumps(out), flush=True)


def _parent(args):
  sizes = [int(s) for s in args.sizes.split(",")]
  for impl in args.impls.split(","):
    for n in sizes:
      iters = args.iters if args.iters > 0 else (2 if n <= 16384 else 1)
      cmd = [os.path.abspath(__file__), "--child", "--impl", impl, "--n", str(n), "--d", str(args.d),
             "--tile_size", str(args.tile_size), "--iters", str(iters), "--mem_cap_gib", str(args.mem_cap_gib),
             "--headroom_gib", str(args.headroom_gib)]
      harness.run_child(cmd, {"impl": impl, "n": n, "d": args.d}, args.timeout_s)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="4096,8192,16384,32768,65536")
  p.add_argument("--impls", default="tiled,naive")
  p.add_argument("--d", type=int, default=512)
  p.add_argument("--tile_size", type=int, default=512)
  p.add_argument("--iters", type=int, default=0, help="timed steps after the warm-up (0: 2 up to N=16384, else 1)")
  harness.add_cap_flags(p, mem_cap_gib=12.0)
  p.add_argument("--impl", default="tiled", help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, default=4096, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    _child(args)
  else:
    _parent(args)


if __name__ == "__main__":
  main()

"""Speed and peak memory of the CLIP loss forward+backward, big_embed's against open_clip's `ClipLoss`.

    python benchmarks/loss_speed.py                                   # N ∈ {4,096, …, 65,536}, big_embed only
    python benchmarks/loss_speed.py --sizes 16384 --peer_python PEER_PYTHON --rounds 2

big_embed: the registry's "clip" loss (`config_utils.loss("clip")`, its defaults unless `--tile_size`), on one
CPU device, float32: N L2-normalised random pairs of width d (seed 0) and the loss's learnable logit scale
(t = log(1/0.07)); the step is `jax.value_and_grad` w.r.t. both embeddings and t, jitted, lowered and compiled
ahead of time (`compile_s`), then one warm-up call and `--iters` timed calls (`seconds`: their median).
With `--peer_python` (the python of a throwaway venv with torch and open_clip), `tools/openclip_reference.py
loss` runs open_clip's `ClipLoss(local_loss=False)`, world size 1, on the same N, d and dtype, the same way (one
warm-up step, the median of `--iters`; torch eager has no compile), with torch's threads = this machine's cores.

Every run is a fresh subprocess (peak RSS = its own `ru_maxrss`) under an address-space cap; the two systems
alternate (A B A B … for `--rounds`), and after each N a "ratio" line compares them: `speedup` = open_clip's
median seconds / big_embed's (> 1: big_embed is faster), `rss_ratio` = big_embed's peak RSS / open_clip's. A
run that does not fit its cap (open_clip at N = 65,536 needs ~50 GB) is a JSON line with "error". Lines:

  {"system": "big_embed", "n": 16384, "d": 512, "tile_size": 1024, "compile_s": …, "xla_temp_gib": …,
   "first_call_s": …, "seconds": …, "seconds_all": […], "loss": …, "peak_rss_gib": …}
  {"system": "open_clip", "n": 16384, …, "seconds": …, "peak_rss_gib": …}
  {"ratio": "n=16384", "big_embed_seconds": …, "peer_seconds": …, "speedup": …, "rss_ratio": …, …}
"""

from __future__ import annotations

import argparse
import json
import os
import time

import harness

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                           "openclip_reference.py")


def _child(args):
  harness.cap_address_space(args)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  harness.project_on_path()
  from big_embed import config_utils as cu  # pylint: disable=g-import-not-at-top
  from big_embed import losses  # pylint: disable=g-import-not-at-top
  from big_embed.ops import l2_normalize  # pylint: disable=g-import-not-at-top
  from big_embed.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  loss_cfg = losses.resolve(cu.loss(args.loss, **({"tile_size": args.tile_size} if args.tile_size else {})))
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  loss_fn = losses.get(args.loss).build(loss_cfg, mesh)
  loss_params = losses.get(args.loss).init_params(loss_cfg)  # {"logit_scale": t}
  step0 = jnp.zeros((), jnp.int32)

  def loss(a, b, params):  # a, b: [N, d]
    return loss_fn({"image": a, "text": b}, {}, params, step0)[0]

  n, d = args.n, args.d
  out = {"system": "big_embed", "loss_name": args.loss, "n": n, "d": d, "dtype": "float32",
         "tile_size": loss_cfg.tile_size,
         "key_mode": loss_cfg.key_mode, "versions": {"jax": jax.__version__}}
  sharding = mesh_lib.batch_sharding(mesh, 2)
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sharding)
  t = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(spec, spec, loss_params).compile()
  out["compile_s"] = round(time.perf_counter() - t, 2)
  out["rss_after_compile_gib"] = harness.peak_rss_gib()
  if not harness.xla_buffers_fit(compiled, out, args.mem_cap_gib):
    print(json.dumps(out), flush=True)
    return
  print(json.dumps({**out, "status": "compiled"}), flush=True)  # the parent reports this line if we die

  rng = np.random.default_rng(0)
  a, b = (jax.device_put(l2_normalize(jnp.asarray(rng.standard_normal((n, d), np.float32))), sharding)
          for _ in range(2))
  last = {}

  def run():
    last["value"] = jax.block_until_ready(compiled(a, b, loss_params))

  out.update(harness.time_runs(run, args.iters))
  out["loss"] = round(float(last["value"][0]), 5)
  out["peak_rss_gib"] = harness.peak_rss_gib()
  print(json.dumps(out), flush=True)


def _parent(args):
  flags = ["--d", str(args.d), "--iters", str(args.iters)]
  for n in [int(s) for s in args.sizes.split(",")]:
    ours, peer = [], []
    for _ in range(args.rounds):
      cmd = [os.path.abspath(__file__), "--child", "--loss", args.loss, "--n", str(n), "--tile_size",
             str(args.tile_size),
             "--mem_cap_gib", str(args.mem_cap_gib), "--headroom_gib", str(args.headroom_gib), *flags]
      ours.append(harness.run_child(cmd, {"system": "big_embed", "n": n, "d": args.d}, args.timeout_s))
      if args.peer_python and args.loss == "clip":
        cmd = [PEER_SCRIPT, "loss", "--n", str(n), "--threads", str(args.threads), "--mem_cap_gib",
               str(args.peer_mem_cap_gib), *flags]
        peer.append(harness.run_child(cmd, {"system": "open_clip", "n": n, "d": args.d}, args.timeout_s,
                                      python=args.peer_python))
    if peer:
      print(json.dumps(harness.ratio_line(f"n={n}", ours, peer, "seconds", higher_is_better=False)), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="4096,8192,16384,32768,65536", help="N, comma-separated")
  p.add_argument("--d", type=int, default=512)
  p.add_argument("--loss", default="clip", choices=("clip", "softclip", "lightclip", "siglip"),
                 help="the registry loss big_embed runs (the open_clip peer is CLIP's)")
  p.add_argument("--tile_size", type=int, default=0, help="config.loss.tile_size (0: the loss's default)")
  p.add_argument("--iters", type=int, default=3, help="timed calls after the warm-up; the median is reported")
  p.add_argument("--rounds", type=int, default=1, help="runs of each system per N, alternating")
  p.add_argument("--peer_python", default="", help="python with torch + open_clip: also run open_clip's ClipLoss")
  p.add_argument("--peer_mem_cap_gib", type=float, default=20.0, help="address-space cap of an open_clip run")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads of the peer")
  harness.add_cap_flags(p, mem_cap_gib=12.0)
  p.add_argument("--n", type=int, default=4096, help=argparse.SUPPRESS)
  args = p.parse_args()
  (_child if args.child else _parent)(args)


if __name__ == "__main__":
  main()

"""Training throughput of the W1 train step, big_embed's against open_clip's, side by side.

    python benchmarks/train_throughput.py                                  # W1, batch 128, fp32 and bf16
    python benchmarks/train_throughput.py --dtypes float32 --peer_python PEER_PYTHON --rounds 2
    python benchmarks/train_throughput.py --dtypes float32 --phases        # where the step's time goes

big_embed: the W1 workload (`harness.workload_config`: ViT image 64, patch 8, width 256, 6 blocks, 4 heads,
MLP 1024; text Transformer width 256, 6 blocks, context 32, vocabulary 49,408; embedding 256; CLIP loss) through
the project's train step (train/step.py: towers, loss, grads, AdamW with clipping, the logit-scale clamp),
jitted with the state donated as training does, lowered and compiled ahead of time, on random images and
token ids of the right shapes; `config.model.dtype` is the compute dtype (params stay float32). After
`--warmup` steps, `--iters` timed steps: `seconds_per_step` is their median, `samples_per_s` = batch / that.
Memory: XLA's buffer sizes (`memory_analysis()`: arguments, outputs, the aliased part, temporaries) and the
child's resident memory after importing JAX, after compiling, after creating the state and at its peak.
`--phases` also times jitted parts of the step on the same state and batch: the towers' forward, forward +
loss, forward + loss + backward (`value_and_grad`), and the whole step; their differences are the loss, the
backward and the optimizer.

With `--peer_python` (the python of a throwaway venv with torch and open_clip), `tools/openclip_reference.py
train` runs open_clip's CLIP of the same architecture (parameter counts printed by both: `params`) with
`ClipLoss` and `torch.optim.AdamW` (same lr, betas, eps, decay mask, gradient clip), bf16 under CPU autocast,
alternating with big_embed (A B A B … for `--rounds`), and a "ratio" line per dtype: `speedup` = big_embed's
samples/s / open_clip's, `rss_ratio` = big_embed's peak RSS / open_clip's. Each run is a fresh subprocess.

`--remat` / `--scan_layers` set those config.model fields (the towers' layer stack: rematerialisation in the
backward, `nn.scan` over the blocks); `--xla_flags` is passed to the child as XLA_FLAGS; `--compile_cache DIR`
turns on JAX's persistent compilation cache (a second run loads the compiled step instead of compiling it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import harness

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                           "openclip_reference.py")


def _time_phases(setup, state, batch, step_run, iters: int) -> dict:
  """Median seconds of the whole step (`step_run`) and of jitted parts of it on the same state and batch: the
  towers' forward, forward + loss, forward + loss + backward. Each part is compiled and called once first; then
  the step and the parts run in turn, `iters` rounds, so that a change in the machine's load hits them alike."""
  import jax  # pylint: disable=g-import-not-at-top
  from big_embed.train import step as step_lib  # pylint: disable=g-import-not-at-top

  rng, step = jax.random.fold_in(state.rng, state.step), state.step.copy()  # `state` is donated by step_run

  def towers(params, batch):
    return setup.model.apply({"params": params["model"]}, batch, rngs={"dropout": rng})

  def forward_and_loss(params, batch):
    return setup.loss_fn(towers(params, batch), batch, params["loss"], step)[0]

  loss_and_grads = step_lib.make_loss_and_grads(setup.model, setup.loss_fn)
  params = jax.tree.map(lambda x: x.copy(), state.params)  # the step donates its state; the parts read a copy
  parts = {"towers_forward": towers, "forward_and_loss": forward_and_loss,
           "forward_loss_backward": lambda params, batch: loss_and_grads(params, batch, rng, step)}
  runs = {name: (lambda f=jax.jit(fn): jax.block_until_ready(f(params, batch))) for name, fn in parts.items()}
  runs["step"] = step_run
  for run in runs.values():
    run()
  times = {name: [] for name in runs}
  for _ in range(iters):
    for name, run in runs.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  med = {name: statistics.median(ts) for name, ts in times.items()}
  return {"step": round(med["step"], 4), "towers_forward": round(med["towers_forward"], 4),
          "loss_forward": round(med["forward_and_loss"] - med["towers_forward"], 4),
          "backward": round(med["forward_loss_backward"] - med["forward_and_loss"], 4),
          "optimizer_and_rest": round(med["step"] - med["forward_loss_backward"], 4)}


def _child(args):
  harness.cap_address_space(args)
  import jax  # pylint: disable=g-import-not-at-top

  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.block_until_ready(jax.numpy.zeros(()))  # the runtime started: its baseline memory
  rss_import = harness.rss_gib()["rss_gib"]
  setup = harness.train_setup("W1", args.batch, args.dtype, args.tile_size or None,
                              model={"remat": args.remat, "scan_layers": args.scan_layers})
  from big_embed.train import compiled_step  # pylint: disable=g-import-not-at-top
  from big_embed.train import state as state_lib  # pylint: disable=g-import-not-at-top

  out = {"system": "big_embed", "workload": "W1", "dtype": args.dtype, "batch": args.batch, "remat": args.remat,
         "scan_layers": args.scan_layers, "params": setup.n_params, "params_m": round(setup.n_params / 1e6, 3),
         "versions": {"jax": jax.__version__}, "rss_after_import_gib": rss_import}
  t = time.perf_counter()
  compiled = jax.jit(setup.step, donate_argnums=(0,)).lower(setup.state_spec, setup.batch_spec).compile()
  out["compile_s"] = round(time.perf_counter() - t, 2)
  compiled_step.release_freed_heap()  # as training does after compiling its step
  rss = harness.rss_gib()
  out["rss_after_compile_gib"], out["peak_rss_after_compile_gib"] = rss["rss_gib"], rss["peak_rss_gib"]
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.state_spec))
  out["state_gib"] = round(state_bytes / harness.GIB, 4)
  if not harness.xla_buffers_fit(compiled, out, args.mem_cap_gib):
    print(json.dumps(out), flush=True)
    return
  print(json.dumps({**out, "status": "compiled"}), flush=True)  # the parent reports this line if we die

  state = state_lib.create_sharded_state(setup.init_fn, setup.shardings)
  compiled_step.release_freed_heap()  # training creates its state before it compiles the step, then releases
  batch = harness.random_batch(setup)
  out["rss_after_state_gib"] = harness.rss_gib()["rss_gib"]
  held = {"state": state}

  def run():
    held["state"], held["metrics"] = compiled(held["state"], batch)
    jax.block_until_ready(held["metrics"])

  timing = harness.time_runs(run, args.iters, args.warmup)
  out.update(first_call_s=timing["first_call_s"], seconds_per_step=timing["seconds"],
             samples_per_s=round(args.batch / timing["seconds"], 2), seconds_all=timing["seconds_all"],
             loss=round(float(held["metrics"]["loss"]), 5), rss_after_steps_gib=harness.rss_gib()["rss_gib"],
             peak_rss_gib=harness.peak_rss_gib())
  if args.phases:  # after the peak RSS was read: the parts hold their own buffers
    out["phases_s"] = _time_phases(setup, held["state"], batch, run, args.iters)
  print(json.dumps(out), flush=True)


def _parent(args):
  common = ["--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
  env = {"XLA_FLAGS": args.xla_flags} if args.xla_flags else None
  for dtype in args.dtypes.split(","):
    ours, peer = [], []
    for _ in range(args.rounds):
      cmd = [os.path.abspath(__file__), "--child", "--dtype", dtype, "--tile_size", str(args.tile_size),
             "--remat", args.remat, "--compile_cache", args.compile_cache, "--mem_cap_gib", str(args.mem_cap_gib),
             "--headroom_gib", str(args.headroom_gib), *common, *(["--phases"] if args.phases else []),
             *(["--scan_layers"] if args.scan_layers else [])]
      ident = {"system": "big_embed", "dtype": dtype, "batch": args.batch}
      ours.append(harness.run_child(cmd, ident, args.timeout_s, env=env))
      if args.peer_python:
        cmd = [PEER_SCRIPT, "train", "--dtype", dtype, "--threads", str(args.threads), "--mem_cap_gib",
               str(args.peer_mem_cap_gib), *common]
        peer.append(harness.run_child(cmd, {**ident, "system": "open_clip"}, args.timeout_s,
                                      python=args.peer_python))
    if peer:
      line = harness.ratio_line(f"W1 {dtype} batch {args.batch}", ours, peer, "samples_per_s",
                                higher_is_better=True)
      print(json.dumps(line), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtypes", default="float32,bfloat16", help="config.model.dtype values, comma-separated")
  p.add_argument("--iters", type=int, default=10, help="timed steps after the warm-up; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
  p.add_argument("--rounds", type=int, default=1, help="runs of each system per dtype, alternating")
  p.add_argument("--tile_size", type=int, default=0, help="config.loss.tile_size (0: the loss's default)")
  p.add_argument("--remat", default="none", choices=("none", "block", "dots"), help="config.model.remat")
  p.add_argument("--scan_layers", action="store_true", help="config.model.scan_layers=True")
  p.add_argument("--phases", action="store_true", help="also time the towers, loss, backward and optimizer")
  p.add_argument("--compile_cache", default="", help="JAX persistent compilation cache directory ('': off)")
  p.add_argument("--xla_flags", default="", help="XLA_FLAGS for the big_embed child")
  p.add_argument("--peer_python", default="", help="python with torch + open_clip: also run open_clip's W1")
  p.add_argument("--peer_mem_cap_gib", type=float, default=20.0, help="address-space cap of an open_clip run")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads of the peer")
  harness.add_cap_flags(p, mem_cap_gib=16.0)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.warmup < 1:
    p.error(f"--warmup must be >= 1, got {args.warmup}")
  (_child if args.child else _parent)(args)


if __name__ == "__main__":
  main()

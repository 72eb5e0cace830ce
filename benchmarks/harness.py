"""What the benchmarks share: each measurement in a fresh subprocess (so peak RSS is its own) that prints JSON
lines, the last one its result (a crash or a timeout is reported as a JSON line with "error"); memory caps and
readings; the median-of-k timing; and the train-step workloads (W1, text_small) with their random batches."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

GIB = 2**30


def run_child(cmd: list[str], ident: dict, timeout_s: int, python: str = sys.executable,
              env: dict | None = None) -> dict:
  """Runs `python cmd` with JAX on CPU (plus `env`), prints its last JSON line and returns it; if it timed out,
  crashed (e.g. out of memory under its cap) or stopped at a "status" line, prints and returns what it had
  measured (or `ident`) with an "error"."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  t = time.perf_counter()
  try:
    proc = subprocess.run([python, *cmd], capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
  except subprocess.TimeoutExpired:
    out = {**ident, "error": f"timeout after {timeout_s} s"}
    print(json.dumps(out), flush=True)
    return out
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode == 0 and lines and "status" not in lines[-1]:
    print(json.dumps(lines[-1]), flush=True)
    return lines[-1]
  last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
  out = {k: v for k, v in (lines[-1] if lines else ident).items() if k != "status"}
  out["error"] = f"exit code {proc.returncode}: {last[0][-300:]}"
  out["wall_s"] = round(time.perf_counter() - t, 1)
  print(json.dumps(out), flush=True)
  return out


def add_cap_flags(p: argparse.ArgumentParser, mem_cap_gib: float) -> None:
  """The flags every memory benchmark has: the XLA buffer budget, the runtime's headroom, a timeout, --child."""
  p.add_argument("--mem_cap_gib", type=float, default=mem_cap_gib, help="budget for XLA buffers of one run")
  p.add_argument("--headroom_gib", type=float, default=4.0, help="extra address space for the runtime itself")
  p.add_argument("--timeout_s", type=int, default=7200)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def cap_address_space(args) -> None:
  """In the child, before the runtime starts: address space capped at mem_cap_gib + headroom_gib (the headroom:
  the runtime reserves virtual memory it never touches; the exact budget check uses XLA's buffer sizes)."""
  cap = int((args.mem_cap_gib + args.headroom_gib) * GIB)
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def rss_gib() -> dict:
  """This process's resident memory now and its peak so far (VmRSS / VmHWM of /proc/self/status), GiB."""
  fields = {}
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      name, _, value = line.partition(":")
      if name in ("VmRSS", "VmHWM"):
        fields[name] = round(int(value.split()[0]) * 1024 / GIB, 3)  # the kernel reports kB
  return {"rss_gib": fields["VmRSS"], "peak_rss_gib": fields["VmHWM"]}


def peak_rss_gib() -> float:
  """Peak resident memory of this process so far (ru_maxrss), GiB."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)


def xla_buffers_fit(compiled, out: dict, mem_cap_gib: float) -> bool:
  """Adds XLA's buffer sizes of `compiled` (`memory_analysis()`: arguments, outputs, temporaries, the aliased
  part of the outputs) to `out`, GiB; False (with an "error" in `out`) if they exceed the cap."""
  mem = compiled.memory_analysis()
  need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  out.update({f"xla_{k}_gib": round(getattr(mem, f"{k}_size_in_bytes") / GIB, 4)
              for k in ("argument", "output", "alias", "temp")})
  out["xla_total_gib"] = round(need / GIB, 4)
  if need > mem_cap_gib * GIB:
    out["error"] = f"needs {need / GIB:.1f} GiB of XLA buffers > cap {mem_cap_gib} GiB; not run"
    return False
  return True


def time_runs(run, iters: int, warmup: int = 1) -> dict:
  """Times `run()` (which must block until its result is ready): `warmup` calls (the first one timed), then
  `iters` timed calls. Returns {"first_call_s", "seconds" (the median of the timed calls), "seconds_all"}."""
  t = time.perf_counter()
  run()
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    run()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return {"first_call_s": round(first, 4), "seconds": round(statistics.median(times) if times else first, 4),
          "seconds_all": [round(x, 4) for x in times]}


def ratio_line(label: str, ours: list[dict], peer: list[dict], key: str, higher_is_better: bool) -> dict:
  """The side-by-side summary of one setting: the median of `key` over each system's runs that did not fail,
  the largest peak RSS, `speedup` (> 1: big_embed is faster) and `rss_ratio` (big_embed / peer)."""

  def summary(rows):
    ok = [r for r in rows if "error" not in r and key in r]
    return (round(statistics.median(r[key] for r in ok), 4) if ok else None,
            max((r["peak_rss_gib"] for r in ok), default=None))

  (a, rss_a), (b, rss_b) = summary(ours), summary(peer)
  out = {"ratio": label, f"big_embed_{key}": a, f"peer_{key}": b, "big_embed_peak_rss_gib": rss_a,
         "peer_peak_rss_gib": rss_b}
  if a and b:
    out["speedup"] = round(a / b if higher_is_better else b / a, 3)
  if rss_a and rss_b:
    out["rss_ratio"] = round(rss_a / rss_b, 3)
  return out


# ------------------------------------------------------------------------------------------------
# Train-step workloads (random inputs, AdamW, one device), shared by gradcache_memory.py and train_throughput.py.


def project_on_path() -> None:
  """Makes `big_embed` importable from this checkout (the benchmarks run as scripts from benchmarks/)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)


def workload_config(workload: str):
  """(config, vocabulary size) of a workload. W1: CLIP loss; ViT image 64, patch 8, width 256, depth 6, heads 4,
  MLP 1024; text Transformer width 256, depth 6, heads 4, MLP 1024, context 32, vocabulary 49,408; embedding 256.
  text_small: CLIP loss on query-key text pairs, one shared BERT tower (width 128, 2 layers, 2 heads, MLP 512,
  context 32, vocabulary 30,522), embedding 128."""
  project_on_path()
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
  raise SystemExit(f"unknown workload {workload!r}; use W1 or text_small")


@dataclasses.dataclass
class TrainSetup:
  """The project's real train step (train/step.py) for one workload on one device, ready to lower."""

  step: Any  # train_step(state, batch) -> (state, metrics), not yet jitted
  model: Any  # its parts, for timing them apart
  loss_fn: Any
  tx: Any
  state_spec: Any  # ShapeDtypeStructs with shardings
  batch_spec: dict  # name -> ShapeDtypeStruct
  init_fn: Any
  shardings: Any
  vocab: int
  n_params: int  # model params (the loss's logit scale not counted)


def train_setup(workload: str, batch: int, dtype: str, tile_size: int | None = None, chunk: int = 0,
                model: dict | None = None) -> TrainSetup:
  """The workload's train step (AdamW from config.train, the loss's clamp, `chunk` > 0: gradient caching) at
  `batch` rows, model compute in `dtype`, `model` other config.model fields (e.g. remat, scan_layers); `tile_size`
  None keeps the loss's default."""
  cfg, vocab = workload_config(workload)
  cfg.model.update(model or {})
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from big_embed import losses  # pylint: disable=g-import-not-at-top
  from big_embed import models  # pylint: disable=g-import-not-at-top
  from big_embed.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import grad_cache  # pylint: disable=g-import-not-at-top
  from big_embed.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg.model.dtype = dtype
  if tile_size is not None:
    cfg.loss.tile_size = tile_size
  cfg.train.batch_size = batch
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  kind = models.kind_of(cfg.model)
  model = kind.build(cfg.model, vocab)
  loss_cfg = losses.resolve(cfg.loss)
  spec = losses.get(loss_cfg.name)
  tx = optimizer_lib.make_optimizer(cfg.train)
  init_fn = state_lib.make_init_fn(model, kind.example_batch(cfg.model), lambda: spec.init_params(loss_cfg), tx, 0)
  abstract, shardings = state_lib.state_shardings(init_fn, mesh, cfg.sharding_rules)
  chunking = grad_cache.Chunking(mesh, chunk, kind.outputs) if chunk else None
  step = step_lib.make_train_step(model, spec.build(loss_cfg, mesh), lambda p: spec.clamp_params(loss_cfg, p), tx,
                                  optimizer_lib.learning_rate_schedule(cfg.train), chunking=chunking)
  length = cfg.model.max_text_len
  if workload == "W1":
    s = cfg.model.image_size
    shapes = {"image": ((batch, s, s, 3), np.uint8), "text": ((batch, length), np.int32)}
  else:
    shapes = {"query": ((batch, length), np.int32), "key": ((batch, length), np.int32)}
  batch_spec = {k: jax.ShapeDtypeStruct(shape, dt, sharding=mesh_lib.batch_sharding(mesh, len(shape)))
                for k, (shape, dt) in shapes.items()}
  state_spec = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params["model"]))
  return TrainSetup(step, model, spec.build(loss_cfg, mesh), tx, state_spec, batch_spec, init_fn, shardings, vocab,
                    n_params)


def random_batch(setup: TrainSetup, seed: int = 0) -> dict:
  """Random inputs of the step's shapes, placed as its batch spec says: pixels in [0, 256), token ids in
  [1, vocab) (no padding)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in setup.batch_spec.items():
    x = rng.integers(0, 256, size=s.shape) if s.dtype == np.uint8 else rng.integers(1, setup.vocab, size=s.shape)
    out[k] = jax.device_put(x.astype(s.dtype), s.sharding)
  return out

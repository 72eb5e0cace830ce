"""The open_clip side of the speed benchmarks (`benchmarks/loss_speed.py`, `benchmarks/train_throughput.py`).

    PEER_PYTHON tools/openclip_reference.py loss --n 16384 --d 512 --iters 3
    PEER_PYTHON tools/openclip_reference.py train --batch 128 --dtype float32 --iters 10

Prints one JSON line, with the same keys as the big_embed side where they mean the same thing:

* `loss`: open_clip's `ClipLoss(local_loss=False)`, world size 1, on N L2-normalised random float32 embeddings
  of width d (NumPy, seed 0: the big_embed side's inputs, so the two losses agree) and a learnable logit scale
  t (κ = exp t, t = log(1/0.07)); a step is the forward and `backward()` w.r.t. both embeddings and t. One
  warm-up step, then the median of `--iters` timed steps.
* `train`: one training step of an open_clip `CLIP` built from an in-memory config with the architecture of the
  benchmarks' W1 workload (`ARCH`), on random uint8 images (scaled to [-1, 1] inside the step, as big_embed's
  ViT does) and random token ids: forward (bf16: under `torch.autocast("cpu", torch.bfloat16)`), `ClipLoss`,
  backward, gradient-norm clip at 1.0, `torch.optim.AdamW` (lr 1e-3, betas (0.9, 0.98), eps 1e-8, weight decay
  0.1 on tensors with ndim >= 2 only, as big_embed's optimizer), logit scale clamped to [0, log 100]. Warm-up
  steps, then the median of `--iters` timed steps, and the median of each phase (forward + loss, backward,
  clip + optimizer).

Each run sets `torch.set_num_threads(--threads)` (default: the cores this process may use, which is what XLA:CPU
uses) and caps its address space at `--mem_cap_gib` (RLIMIT_AS); a step that runs out of memory under the cap
exits with torch's error after a "status" line, which the benchmark reports as a JSON line with "error".

This script needs PyTorch and open_clip, which big_embed never depends on; run it with the python of a throwaway
virtual environment outside the project (the benchmarks take that python as `--peer_python`):

    python3 -m venv PEER_VENV
    PEER_VENV/bin/pip install torch==2.13.0                  # the CPU build first
    PEER_VENV/bin/pip install --no-deps open-clip-torch==3.3.0
    PEER_VENV/bin/pip install regex ftfy tqdm huggingface-hub safetensors numpy

open_clip imports torchvision at import time (only its image transforms and a frozen batch norm use it) and
there is no CPU torchvision for this torch, so `import_open_clip` registers stand-in modules for it first.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import os
import resource
import statistics
import sys
import time
import types

import numpy as np

GIB = 2**30

# W1 as an open_clip model config. Versus big_embed's W1 (benchmarks/harness.py `workload_config`):
# * vision: open_clip's ViT always has a class token (+256 params, and one more position: +256) and a patch
#   convolution without bias (-256); `pool_type="avg"` averages the patch tokens as big_embed does, and
#   `no_ln_pre` drops the LayerNorm before the blocks that big_embed does not have. 65 tokens instead of 64.
# * text: open_clip's text tower is causal and pools the token with the largest id (its end-of-text token);
#   big_embed's attends over all real tokens and mean-pools them. Same parameters, same matmuls.
# * MLP GELU: exact (erf) in torch, tanh-approximated in Flax; LayerNorm eps 1e-5 vs 1e-6.
# The model parameter counts agree to < 0.01 % (printed by both sides as `params`).
ARCH = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64,
                   "mlp_ratio": 4.0, "pool_type": "avg", "no_ln_pre": True},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6,
                 "mlp_ratio": 4.0},
}
MODEL_NAME = "big_embed-W1"


def import_open_clip():
  """open_clip, with stand-in torchvision modules registered first (nothing on the model or loss path uses them)."""

  class _Stub(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return type(name, (), {"__init__": lambda self, *a, **k: None})

  class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

  for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
               "torchvision.ops.misc"):
    module = sys.modules.setdefault(name, _Stub(name))
    parent, _, child = name.rpartition(".")
    if parent:
      setattr(sys.modules[parent], child, module)
  sys.modules["torchvision.transforms"].InterpolationMode = InterpolationMode
  sys.modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
  import open_clip  # pylint: disable=g-import-not-at-top
  return open_clip


def _setup(args):
  cap = int(args.mem_cap_gib * GIB)
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  return torch


def _peak_rss_gib() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)


def _warm_then_time(run, warmup: int, iters: int) -> tuple[float, list]:
  """(seconds of the first warm-up call, the results of the timed calls); `run()` returns its own timings."""
  t = time.perf_counter()
  run()
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    run()
  return first, [run() for _ in range(iters)]


def loss_child(args) -> None:
  torch = _setup(args)
  open_clip = import_open_clip()
  out = {"system": "open_clip", "n": args.n, "d": args.d, "dtype": "float32", "threads": args.threads,
         "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__}}
  print(json.dumps({**out, "status": "started"}), flush=True)  # reported with the error if the step dies
  rng = np.random.default_rng(0)  # the same inputs as the big_embed side, so the losses agree
  a, b = (torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((args.n, args.d), np.float32)), dim=-1)
          .requires_grad_() for _ in range(2))
  t = torch.tensor(math.log(1 / 0.07), requires_grad=True)
  loss_fn = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, rank=0, world_size=1)
  last = {}

  def run():
    start = time.perf_counter()
    for x in (a, b, t):
      x.grad = None
    loss = loss_fn(a, b, t.exp())
    loss.backward()
    last["loss"] = float(loss.detach())
    return time.perf_counter() - start

  first, times = _warm_then_time(run, 1, args.iters)
  out.update(first_call_s=round(first, 4), seconds=round(statistics.median(times), 4),
             seconds_all=[round(x, 4) for x in times], loss=round(last["loss"], 5), peak_rss_gib=_peak_rss_gib())
  print(json.dumps(out), flush=True)


def build_model(open_clip):
  """The W1 CLIP of `ARCH`, through open_clip's factory from an in-memory config (no weights)."""
  open_clip.factory._MODEL_CONFIGS[MODEL_NAME] = ARCH  # pylint: disable=protected-access
  return open_clip.create_model(MODEL_NAME, pretrained=None, precision="fp32", device="cpu", output_dict=True)


def train_child(args) -> None:
  torch = _setup(args)
  open_clip = import_open_clip()
  rss_start = _peak_rss_gib()
  model = build_model(open_clip)
  model.train()
  n_params = sum(p.numel() for name, p in model.named_parameters() if name != "logit_scale")
  out = {"system": "open_clip", "workload": "W1", "dtype": args.dtype, "batch": args.batch, "threads": args.threads,
         "params": n_params, "params_m": round(n_params / 1e6, 3),
         "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__}}
  print(json.dumps({**out, "status": "built"}), flush=True)
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
  loss_fn = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, rank=0, world_size=1)
  g = torch.Generator().manual_seed(0)
  size, ctx = ARCH["vision_cfg"]["image_size"], ARCH["text_cfg"]["context_length"]
  images = torch.randint(0, 256, (args.batch, 3, size, size), generator=g, dtype=torch.uint8)
  texts = torch.randint(1, ARCH["text_cfg"]["vocab_size"], (args.batch, ctx), generator=g)
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  max_t = math.log(100.0)
  last = {}

  def run():
    t0 = time.perf_counter()
    with autocast:
      emb = model(images.float() / 127.5 - 1.0, texts)
      loss = loss_fn(emb["image_features"], emb["text_features"], emb["logit_scale"])
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, max_t)
    t3 = time.perf_counter()
    last["loss"] = float(loss.detach())
    return {"step": t3 - t0, "forward_and_loss": t1 - t0, "backward": t2 - t1, "clip_and_optimizer": t3 - t2}

  rss_built = _peak_rss_gib()
  first, phases = _warm_then_time(run, args.warmup, args.iters)
  step_s = statistics.median(p["step"] for p in phases)
  out.update(first_call_s=round(first, 4), seconds_per_step=round(step_s, 4),
             samples_per_s=round(args.batch / step_s, 2), seconds_all=[round(p["step"], 4) for p in phases],
             phases_s={k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0] if k != "step"},
             loss=round(last["loss"], 5), rss_after_import_gib=rss_start, rss_after_build_gib=rss_built,
             peak_rss_gib=_peak_rss_gib())
  print(json.dumps(out), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  loss = sub.add_parser("loss", help="ClipLoss forward + backward on N random pairs")
  loss.add_argument("--n", type=int, default=16384)
  loss.add_argument("--d", type=int, default=512)
  train = sub.add_parser("train", help="one W1 training step")
  train.add_argument("--batch", type=int, default=128)
  train.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  train.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
  for p in (loss, train):
    p.add_argument("--iters", type=int, default=3, help="timed steps after the warm-up (their median is reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--mem_cap_gib", type=float, default=20.0, help="address-space cap of this process")
  args = parser.parse_args()
  if getattr(args, "warmup", 1) < 1:
    parser.error(f"--warmup must be >= 1, got {args.warmup}")
  (loss_child if args.what == "loss" else train_child)(args)


if __name__ == "__main__":
  main()

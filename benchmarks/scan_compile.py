"""Compile time of a 12-layer tower's forward+backward with the blocks unrolled vs scanned, remat none vs block.

    python benchmarks/scan_compile.py                        # both towers, scan off/on, remat none/block, dropout 0/0.1
    python benchmarks/scan_compile.py --towers text --remats none --dropouts 0

Towers (batch 64, context 32 tokens, float32, one CPU device):

* text: `models.text.TextTransformer`, width 256, 4 heads, MLP 1024, 12 pre-LN blocks (mean pooled);
* bert: `models.bert.BertEncoder` the size of all-MiniLM-L12-v2: hidden 384, 12 heads, intermediate 1536, 12 layers,
  vocabulary 30,522.

The step is `jax.jit(jax.value_and_grad(loss))` w.r.t. the tower's params, loss = mean of the squared pooled
features, dropout (row-keyed, `models.dropout`) at the given rate on every site. Each case runs in a fresh
subprocess with JAX's persistent compilation cache off, so every compile is a cold one. One JSON line per case:

  {"tower": "text", "layers": 12, "scan_layers": true, "remat": "none", "dropout": 0.0, "lower_s": …,
   "compile_s": …, "temp_mib": …, "seconds_per_step": …}

`lower_s`: tracing + lowering to StableHLO; `compile_s`: XLA compilation; `temp_mib`: XLA's temporary buffers
(`memory_analysis()`); `seconds_per_step`: mean of 3 runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BATCH, CONTEXT, LAYERS = 64, 32, 12


def _tower(name: str, dropout: float, remat: str, scan: bool):
  from big_embed.models import bert  # pylint: disable=g-import-not-at-top
  from big_embed.models import text  # pylint: disable=g-import-not-at-top
  stack = {"remat": remat, "scan_layers": scan}
  if name == "text":
    return text.TextTransformer(256, LAYERS, 4, 1024, vocab_size=8192, max_len=CONTEXT, dropout=dropout,
                                attention_dropout=dropout, **stack), 8192
  return bert.BertEncoder(vocab_size=30522, hidden_size=384, num_layers=LAYERS, num_heads=12, intermediate_size=1536,
                          dropout_rate=dropout, **stack), 30522


def _child(args):
  case = argparse.Namespace(**json.loads(args.case))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_enable_compilation_cache", False)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from big_embed.models import dropout as dropout_lib  # pylint: disable=g-import-not-at-top

  tower, vocab = _tower(case.tower, case.dropout, case.remat, case.scan_layers)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (BATCH, CONTEXT), 1, vocab, jnp.int32)
  params = jax.jit(lambda: nn.unbox(tower.init(jax.random.PRNGKey(1), tokens)["params"]))()

  def loss(p, tokens, key):
    rows = dropout_lib.RowKeys(key, jnp.arange(BATCH, dtype=jnp.int32)) if case.dropout else None
    out = tower.apply({"params": p}, tokens, rows)
    features = out if out.ndim == 2 else jnp.mean(out.astype(jnp.float32), axis=1)  # [B, D]
    return jnp.mean(features ** 2)

  step = jax.jit(jax.value_and_grad(loss))
  key = jax.random.PRNGKey(2)
  t = time.perf_counter()
  lowered = step.lower(params, tokens, key)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(params, tokens, key))  # warm-up
  times = []
  for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens, key))
    times.append(time.perf_counter() - t)
  print(json.dumps({"tower": case.tower, "layers": LAYERS, "scan_layers": case.scan_layers, "remat": case.remat,
                    "dropout": case.dropout, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
                    "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
                    "seconds_per_step": round(sum(times) / len(times), 3)}), flush=True)


def _parent(args):
  for tower in args.towers.split(","):
    for dropout in (float(d) for d in args.dropouts.split(",")):
      for remat in args.remats.split(","):
        for scan in (False, True):
          case = {"tower": tower, "scan_layers": scan, "remat": remat, "dropout": dropout}
          cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
          try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, check=False,
                                  env={**os.environ, "JAX_PLATFORMS": "cpu"})
          except subprocess.TimeoutExpired:
            print(json.dumps({**case, "error": f"timeout after {args.timeout_s} s"}), flush=True)
            continue
          lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
          if proc.returncode == 0 and lines:
            print(lines[-1], flush=True)
          else:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
            print(json.dumps({**case, "error": f"exit code {proc.returncode}: {last[0][-300:]}"}), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--towers", default="text,bert")
  p.add_argument("--remats", default="none,block")
  p.add_argument("--dropouts", default="0,0.1")
  p.add_argument("--timeout_s", type=int, default=1800)
  p.add_argument("--case", default="", help=argparse.SUPPRESS)  # the child's case: JSON of _child's arguments
  args = p.parse_args()
  (_child if args.case else _parent)(args)


if __name__ == "__main__":
  main()

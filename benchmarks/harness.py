"""What the memory benchmarks share: each measurement in a fresh subprocess (so peak RSS is its own) that prints
JSON lines, the last one its result; a crash or a timeout is reported as a JSON line with "error"."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_child(cmd: list[str], ident: dict, timeout_s: int) -> None:
  """Runs `cmd` with JAX on CPU and prints its last JSON line; if it timed out, crashed (e.g. out of memory under
  its cap) or stopped at a "status" line, prints what it had measured (or `ident`) with an "error"."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  t = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
  except subprocess.TimeoutExpired:
    print(json.dumps({**ident, "error": f"timeout after {timeout_s} s"}), flush=True)
    return
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode == 0 and lines and "status" not in lines[-1]:
    print(json.dumps(lines[-1]), flush=True)
    return
  last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
  out = {k: v for k, v in (lines[-1] if lines else ident).items() if k != "status"}
  out["error"] = f"exit code {proc.returncode}: {last[0][-300:]}"
  out["wall_s"] = round(time.perf_counter() - t, 1)
  print(json.dumps(out), flush=True)


def add_cap_flags(p: argparse.ArgumentParser, mem_cap_gib: float) -> None:
  """The flags every memory benchmark has: the XLA buffer budget, the runtime's headroom, a timeout, --child."""
  p.add_argument("--mem_cap_gib", type=float, default=mem_cap_gib, help="budget for XLA buffers of one run")
  p.add_argument("--headroom_gib", type=float, default=4.0, help="extra address space for the runtime itself")
  p.add_argument("--timeout_s", type=int, default=7200)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def cap_address_space(args) -> None:
  """In the child, before the runtime starts: address space capped at mem_cap_gib + headroom_gib (the headroom:
  the runtime reserves virtual memory it never touches; the exact budget check uses XLA's buffer sizes)."""
  cap = int((args.mem_cap_gib + args.headroom_gib) * 2**30)
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

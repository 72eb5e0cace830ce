"""What every experiment script shares: a grid of ordinary big_embed runs, their results, a JSON and a figure.

An experiment is a list of `Run`s (a committed recipe, its command-line overrides and a seed), each an ordinary

    python -m big_embed.main --config configs/<recipe>.py --workdir runs/experiments/<arm>-s<seed> ...

A run whose workdir already holds its final results is not run again (delete the workdir to redo it); a run killed
half-way resumes from its checkpoint, as any big_embed run does. `run_all` returns each run's `eval_results.json`
with the command and the wall time; `summarise` turns the seeds of each arm into mean, spread and values; `save`
writes `experiments/results/<experiment>.json`, which `make_results.py` turns into docs/results.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"
RUNS_DIR = pathlib.Path(os.environ.get("BIG_EMBED_EXPERIMENT_RUNS", ROOT / "runs" / "experiments"))
RECORD = "experiment_run.json"  # in each run's workdir: its command, wall time and final results


@dataclasses.dataclass(frozen=True)
class Run:
  """One big_embed run of an experiment: `arm` is the method it stands for, `seed` its config.seed."""

  arm: str
  recipe: str  # e.g. "configs/distill_minilm.py:disco"
  seed: int = 0
  overrides: tuple[str, ...] = ()  # e.g. ("--config.train.steps=60",)
  mode: str = "train"  # "eval": evaluate the recipe's initial model (an empty workdir), no training

  @property
  def name(self) -> str:
    return f"{self.arm}-s{self.seed}"

  def command(self, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "big_embed.main", f"--config={self.recipe}", f"--workdir={workdir}",
            f"--mode={self.mode}", f"--config.seed={self.seed}", *self.overrides]


def shell_line(command: Sequence[str]) -> str:
  """The command as one would type it from the repository root (python, relative workdir)."""
  words = ["python", *command[1:]]
  return " ".join(shlex.quote(w.replace(str(ROOT) + os.sep, "")) for w in words)


def run_one(run: Run) -> dict[str, Any]:
  """Runs (or reuses) one run; returns {arm, seed, command, wall_s, results}.

  The workdir is runs/experiments/<arm>-s<seed>, shared by every experiment that uses the same run (a baseline
  compared with several methods runs once). A workdir left by a different command is cleared first, so that a run
  never resumes another configuration's checkpoint; one killed half-way by the same command resumes.

  Raises:
    RuntimeError: the run failed; the message has its log's last lines.
  """
  workdir = RUNS_DIR / run.name
  record_path, command_path = workdir / RECORD, workdir / "experiment_command.txt"
  command = run.command(workdir)
  line = shell_line(command)
  if record_path.is_file():
    record = json.loads(record_path.read_text())
    if record["command"] == line:
      print(f"  {run.name}: reused ({record['wall_s']:.0f} s when it ran)", flush=True)
      return record
  if workdir.exists() and not (command_path.is_file() and command_path.read_text() == line):
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  command_path.write_text(line)
  print(f"  {run.name}: {line}", flush=True)
  start = time.perf_counter()
  with open(workdir / "log.txt", "w", encoding="utf-8") as log:
    proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  wall_s = time.perf_counter() - start
  if proc.returncode != 0:
    tail = (workdir / "log.txt").read_text(encoding="utf-8").splitlines()[-15:]
    raise RuntimeError(f"{run.name} failed (exit {proc.returncode}): {line}\n" + "\n".join(tail))
  results = json.loads((workdir / "eval_results.json").read_text())
  record = dict(arm=run.arm, seed=run.seed, command=line, wall_s=round(wall_s, 1), results=results)
  record_path.write_text(json.dumps(record, indent=1))
  print(f"  {run.name}: {wall_s:.0f} s", flush=True)
  return record


def run_all(experiment: str, runs: Sequence[Run]) -> list[dict[str, Any]]:
  print(f"{experiment}: {len(runs)} runs", flush=True)
  return [run_one(r) for r in runs]


def lookup(results: dict, path: str) -> float:
  """`results` at a slash path, e.g. "lee50/spearman"."""
  value: Any = results
  for part in path.split("/"):
    value = value[part]
  return float(value)


def summarise(records: Sequence[dict], metrics: dict[str, str | Callable[[dict], float]]) -> dict[str, Any]:
  """{arm: {metric label: {mean, std, values}}} over the seeds of each arm, arms in first-seen order.
  `metrics` maps a label to a slash path into eval_results.json or to a function of it."""
  arms: dict[str, list[dict]] = {}
  for rec in records:
    arms.setdefault(rec["arm"], []).append(rec)
  out = {}
  for arm, recs in arms.items():
    out[arm] = {}
    for label, how in metrics.items():
      values = [how(r["results"]) if callable(how) else lookup(r["results"], how) for r in recs]
      mean = sum(values) / len(values)
      std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
      out[arm][label] = dict(mean=mean, std=std, values=values)
  return out


def compare(summary: dict, method: str, baseline: str, metric: str) -> str:
  """The verdict rule of docs/results.md for one metric: "better" when the method's mean beats the baseline's by
  more than twice the larger seed spread (and every seed pairing agrees), "worse" the same way round, else
  "within noise"."""
  m, b = summary[method][metric], summary[baseline][metric]
  margin = 2 * max(m["std"], b["std"])
  diff = m["mean"] - b["mean"]
  if diff > margin and min(m["values"]) > max(b["values"]) - 1e-12:
    return "better"
  if -diff > margin and max(m["values"]) < min(b["values"]) + 1e-12:
    return "worse"
  return "within noise"


def save(experiment: str, payload: dict[str, Any]) -> pathlib.Path:
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  path = RESULTS_DIR / f"{experiment}.json"
  path.write_text(json.dumps(payload, indent=1) + "\n")
  print(f"wrote {path}", flush=True)
  return path


def arms_figure(experiment: str, summary: dict, metrics: Sequence[str], title: str) -> str:
  """One panel per metric (its own y range, so that small differences show), one column per arm: the mean with
  the seed std as error bar, the seeds as dots. Returns the png's name under experiments/results/."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  arms = list(summary)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  cols = min(3, len(metrics))
  rows = math.ceil(len(metrics) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols * (0.4 * len(arms) + 1.4), rows * 3.3), squeeze=False)
  for ax in axes.flat[len(metrics):]:
    ax.set_visible(False)
  for ax, metric in zip(axes.flat, metrics):
    for a, arm in enumerate(arms):
      s = summary[arm][metric]
      ax.errorbar([a], [s["mean"]], yerr=[s["std"]], fmt="o", capsize=4, color=colors[a % len(colors)])
      ax.plot([a] * len(s["values"]), s["values"], "k.", markersize=3)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    ax.set_title(metric, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(title)
  return _save_figure(experiment, fig)


def payload(experiment: str, claim: str, records: Sequence[dict], summary: dict, verdicts: dict[str, str],
            figure: str, **extra) -> dict[str, Any]:
  """What an experiment's JSON holds (make_results.py reads these keys)."""
  return dict(experiment=experiment, claim=claim, figure=figure, summary=summary, verdicts=verdicts,
              seeds=sorted({r["seed"] for r in records}),
              wall_s=round(sum(r["wall_s"] for r in records), 1),
              commands=[r["command"] for r in records], runs=list(records), **extra)


SEEDS = (0, 1, 2)


def mean_of(*paths: str) -> Callable[[dict], float]:
  """A metric that averages several slash paths of eval_results.json (e.g. both retrieval directions)."""
  return lambda results: sum(lookup(results, p) for p in paths) / len(paths)


def line_figure(experiment: str, summary: dict, panels: dict[str, dict[str, list[tuple[Any, str, str]]]],
                xlabel: str, title: str, logx: bool = False) -> str:
  """Side-by-side panels of lines: `panels` maps a panel's y label to {series label: [(x, arm, metric), ...]};
  each point is that arm's metric (mean ± seed std, dots = seeds). Returns the png's name under
  experiments/results/."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
  for ax, (ylabel, series) in zip(axes[0], panels.items()):
    for label, points in series.items():
      xs = [x for x, _, _ in points]
      stats = [summary[arm][metric] for _, arm, metric in points]
      ax.errorbar(xs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3, marker="o",
                  label=label)
      for x, s in zip(xs, stats):
        ax.plot([x] * len(s["values"]), s["values"], "k.", markersize=3)
    if logx:
      ax.set_xscale("log", base=2)
      ax.set_xticks(sorted({x for points in series.values() for x, _, _ in points}))
      ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  return _save_figure(experiment, fig)


def _save_figure(experiment: str, fig) -> str:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  name = f"{experiment}.png"
  fig.savefig(RESULTS_DIR / name, dpi=110)
  plt.close(fig)
  return name


def verdict(verdicts: dict[str, str]) -> str:
  """The claim's one word from its comparisons: "reproduced" when every comparison is "better", "not reproduced"
  when none is and at least one is "worse", else "inconclusive"."""
  outcomes = set(verdicts.values())
  if outcomes == {"better"}:
    return "reproduced"
  if "worse" in outcomes and "better" not in outcomes:
    return "not reproduced"
  return "inconclusive"


def image_text_budget(steps: int = 150, batch_size: int = 128) -> tuple[str, ...]:
  """The image-text experiments' shared budget (the quickstart model and data): `steps` of `batch_size`, one
  evaluation and one checkpoint at the end."""
  return (f"--config.train.steps={steps}", f"--config.train.batch_size={batch_size}",
          f"--config.train.warmup_steps={max(1, steps // 10)}", f"--config.train.log_every={max(1, steps // 5)}",
          f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
          "--config.train.keep_checkpoints=1")


ZERO_SHOT = "fashion_mnist/top1"
RETRIEVAL_R10 = mean_of("emoji/i2t_r10", "emoji/t2i_r10")
IMAGE_TEXT_METRICS = {"Fashion-MNIST zero-shot top-1": ZERO_SHOT, "emoji retrieval R@10": RETRIEVAL_R10}


def lookup_steps(budget: Sequence[str]) -> int:
  """The train.steps of a budget's overrides (a schedule ramp set to the whole run)."""
  return int(next(o for o in budget if o.startswith("--config.train.steps=")).partition("=")[2])


def arms_experiment(experiment: str, claim: str, runs: Sequence[Run], metrics: dict[str, str | Callable[[dict], float]],
                   comparisons: Sequence[tuple[str, str]], title: str,
                   verdict_metrics: Sequence[str] = ()) -> dict[str, Any]:
  """The common experiment: run `runs`, summarise `metrics` per arm, compare each (method, baseline) of
  `comparisons` on `verdict_metrics` (default: every metric), draw a panel per metric, save the JSON; returns
  it."""
  records = run_all(experiment, runs)
  summary = summarise(records, metrics)
  verdicts = {f"{method} vs {baseline}: {m}": compare(summary, method, baseline, m)
              for method, baseline in comparisons for m in (verdict_metrics or metrics)}
  figure = arms_figure(experiment, summary, list(metrics), title)
  data = payload(experiment, claim, records, summary, verdicts, figure, verdict=verdict(verdicts))
  save(experiment, data)
  return data

"""experiments/: every run of every experiment is a valid big_embed config (the recipe loads, the overrides apply,
`config_schema.validate` passes), the verdict rule, and the results page from JSONs."""

import importlib
import json

from absl import flags
from ml_collections import config_flags
import pytest

from big_embed import config_schema
from big_embed import config_utils
from big_embed import losses
from experiments import common as ex
from experiments import make_results


def _config_of(run: ex.Run):
  """The config `python -m big_embed.main` would run for `run` (main's own steps: recipe, loss, overrides)."""
  path, _, arg = run.recipe.partition(":")
  config = config_utils.load_recipe(ex.ROOT / path, arg or None)
  overrides = [*run.overrides, f"--config.seed={run.seed}"]
  if any(o.startswith("--config.loss.") for o in overrides):
    config.loss = losses.resolve(config.loss)
  argv = ["main", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", make_results.EXPERIMENTS)
def test_every_run_of_an_experiment_is_a_valid_config(name):
  runs = importlib.import_module(f"experiments.{name}").runs()
  assert runs and len({r.name for r in runs}) == len(runs)
  for run in runs:
    config = _config_of(run)
    config_schema.validate(config)
    for override in run.overrides:  # each override took effect
      field, _, value = override[len("--config."):].partition("=")
      got = config
      for part in field.split("."):
        got = got[part]
      assert str(got) == value or float(got) == float(value), (run.name, override, got)


def test_the_same_run_name_is_the_same_command_in_every_experiment():
  seen = {}
  for name in make_results.EXPERIMENTS:
    for run in importlib.import_module(f"experiments.{name}").runs():
      line = ex.shell_line(run.command(ex.RUNS_DIR / run.name))
      assert seen.setdefault(run.name, line) == line, (name, run.name)


def _records(arm, values):
  return [dict(arm=arm, seed=s, command=f"{arm} {s}", wall_s=1.0, results={"m": {"x": v}}) for s, v in
          enumerate(values)]


@pytest.mark.parametrize("method, baseline, outcome", [
    ([0.50, 0.52, 0.51], [0.40, 0.41, 0.42], "better"),
    ([0.40, 0.41, 0.42], [0.50, 0.52, 0.51], "worse"),
    ([0.50, 0.52, 0.51], [0.49, 0.50, 0.52], "within noise"),
    ([0.60, 0.61, 0.40], [0.45, 0.46, 0.47], "within noise"),  # a large spread
    ([0.50, 0.50, 0.50], [0.40, 0.40, 0.55], "within noise"),  # the seeds overlap
])
def test_the_verdict_rule(method, baseline, outcome):
  summary = ex.summarise(_records("a", method) + _records("b", baseline), {"x": "m/x"})
  mean = sum(method) / 3
  std = (sum((v - mean) ** 2 for v in method) / 2) ** 0.5
  assert summary["a"]["x"]["mean"] == pytest.approx(mean) and summary["a"]["x"]["std"] == pytest.approx(std)
  assert ex.compare(summary, "a", "b", "x") == outcome
  assert ex.verdict({"c": outcome}) == {"better": "reproduced", "worse": "not reproduced"}.get(outcome,
                                                                                               "inconclusive")


def test_a_mix_of_better_and_worse_is_inconclusive():
  assert ex.verdict({"a": "better", "b": "worse"}) == "inconclusive"
  assert ex.verdict({"a": "worse", "b": "within noise"}) == "not reproduced"


def test_the_page_has_a_table_figure_and_verdict_per_experiment_and_says_what_has_not_run(tmp_path, monkeypatch):
  monkeypatch.setattr(ex, "RESULTS_DIR", tmp_path)
  monkeypatch.setattr(make_results, "PAGE", tmp_path / "results.md")
  records = _records("softclip", [0.5, 0.52, 0.51]) + _records("clip", [0.4, 0.41, 0.42])
  summary = ex.summarise(records, {"top-1": "m/x"})
  verdicts = {"softclip vs clip: top-1": ex.compare(summary, "softclip", "clip", "top-1")}
  ex.save("softclip", ex.payload("softclip", "the claim", records, summary, verdicts, "softclip.png",
                                 verdict=ex.verdict(verdicts)))
  monkeypatch.setattr("sys.argv", ["make_results"])
  make_results.main()
  page = (tmp_path / "results.md").read_text()
  assert "## softclip: reproduced" in page and "![softclip](../experiments/results/softclip.png)" in page
  assert "| softclip | 3 | 0.510 ± 0.010 |" in page and "softclip vs clip: top-1: **better**" in page
  assert "softclip 0" in page  # the runs' commands
  assert "Not run yet: `python -m experiments.distillation`" in page
  assert json.loads((tmp_path / "softclip.json").read_text())["wall_s"] == 6.0

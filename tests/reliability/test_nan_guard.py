"""The NaN guard inside the train step: a step whose loss, gradient norm or update is not finite is skipped (the
parameters and optimizer state bit for bit unchanged) and counted; `config.train.max_bad_steps` consecutive skips
stop the run with one error naming the step and its loss parts; no checkpoint ever holds a non-finite value; and
evaluators reject non-finite embeddings instead of scoring them.

Non-finite steps are forced in-process: the loss function of the tiny quickstart run is wrapped so that chosen
steps give a NaN loss, an inf loss, or a finite loss with a NaN gradient; an update that overflows from finite
gradients comes from an infinite learning rate.
"""

from __future__ import annotations

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_embed import checkpoint as ckpt_lib
from big_embed import evaluate
from big_embed import metrics as metrics_lib
from big_embed import run as run_lib
from big_embed.errors import TrainingError
from big_embed.evaluate import encode as encode_lib
from big_embed.evaluate import retrieval
from big_embed.train import experiment as experiment_lib
from big_embed.train import loop
from big_embed.train import state as state_lib
from big_embed.train import step as step_lib
from tests import tiny

KINDS = ("nan", "inf", "grad")


@jax.custom_vjp
def _nan_cotangent(x, flag):
  """The identity on `x`; its gradient becomes NaN where `flag` (a bool scalar) is set."""
  del flag
  return x


_nan_cotangent.defvjp(lambda x, flag: (x, flag), lambda flag, g: (jnp.where(flag, jnp.nan, g), None))


def _poison(monkeypatch, bad: dict[int, str]) -> None:
  """Wraps every train step's loss: at loop step s (the state's step s - 1) with `bad[s]` == "nan" / "inf" the
  loss and its parts are multiplied by NaN / inf; "grad" keeps the loss finite and makes the gradient NaN."""
  at = {kind: jnp.array([s - 1 for s, k in bad.items() if k == kind] or [-1], jnp.int32) for kind in KINDS}
  make = step_lib.make_train_step

  def make_poisoned(model, loss_fn, *args, **kwargs):
    def poisoned(emb, batch, loss_params, step):
      emb = {**emb, "image": _nan_cotangent(emb["image"], jnp.isin(step, at["grad"]))}
      loss, metrics = loss_fn(emb, batch, loss_params, step)
      scale = jnp.where(jnp.isin(step, at["nan"]), jnp.nan, jnp.where(jnp.isin(step, at["inf"]), jnp.inf, 1.0))
      return loss * scale, {k: v * scale if k.startswith("loss") else v for k, v in metrics.items()}

    return make(model, poisoned, *args, **kwargs)

  monkeypatch.setattr(step_lib, "make_train_step", make_poisoned)


def _config(data_dir, **train):
  cfg = tiny.tiny_config(data_dir, steps=train.pop("steps"))
  cfg.train.update(dict(warmup_steps=0, keep_checkpoints=20, **train))  # every update a real one, all kept
  cfg.evals = {}
  return cfg


def _checkpoints(cfg, workdir) -> dict[int, dict]:
  """{step: the host copy of its whole train state} of every step directory in `workdir`, each restored and
  verified."""
  exp = experiment_lib.build_experiment(cfg, workdir)
  abstract = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  try:
    return {s: jax.device_get(exp.checkpointer.restore(s, abstract)[0]) for s in exp.checkpointer.step_dirs()}
  finally:
    exp.checkpointer.close()


def _finite(state) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _same(a, b) -> bool:
  """Bitwise equal trees (NaN-safe: compares the bytes)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def _records(workdir) -> dict[int, dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


# ------------------------------------------------------------------------------------------------
# The step itself, on a toy model (compiles in a second): what a skipped step keeps.


class _Toy(nn.Module):
  @nn.compact
  def __call__(self, batch):
    return {"image": nn.Dense(3)(batch["x"])}


def _toy_loss(emb, batch, loss_params, step):
  del batch, step
  loss = jnp.mean(emb["image"] ** 2) * loss_params["w"]
  return loss, {"loss_part": loss}


def _toy_step(learning_rate: float):
  """(jitted train step, its initial state) of `_Toy` under Adam at `learning_rate`."""
  tx = optax.adam(learning_rate)
  params = {"model": _Toy().init(jax.random.PRNGKey(0), {"x": jnp.ones((4, 5))})["params"],
            "loss": {"w": jnp.float32(2.0)}}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(1))
  step = step_lib.make_train_step(_Toy(), _toy_loss, lambda p: p, tx, lambda count: jnp.float32(learning_rate))
  return jax.jit(step), state


@pytest.mark.parametrize("case", ["applied", "nan_input", "overflowing_update"])
def test_a_non_finite_step_keeps_the_parameters_and_optimizer_state_bitwise(case):
  """A NaN input gives a NaN loss and gradient; an infinite learning rate an update that overflows from a finite
  loss and gradient. Either way: skipped, everything but the step counter bitwise unchanged."""
  step, state = _toy_step(float("inf") if case == "overflowing_update" else 1e-2)
  x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)
  if case == "nan_input":
    x[2, 3] = np.nan
  new, metrics = jax.device_get(step(state, {"x": jnp.asarray(x)}))
  before = jax.device_get(state)
  assert int(new.step) == 1 and _same(new.rng, before.rng)
  unchanged = _same(new.params, before.params) and _same(new.opt_state, before.opt_state)
  if case == "applied":
    assert metrics["skipped"] == 0 and not unchanged and _finite(new)
  else:
    assert metrics["skipped"] == 1 and unchanged, metrics
    assert math.isfinite(metrics["loss"]) == (case == "overflowing_update")


def test_the_window_means_leave_out_skipped_steps():
  window = metrics_lib.TrainWindow("cpu")
  steps = [(0.5, 0.0), (float("nan"), 1.0), (2.5, 0.0), (float("inf"), 1.0)]
  for i, (loss, skipped) in enumerate(steps):
    window.add(i + 1, {"loss": jnp.float32(loss), "skipped": jnp.float32(skipped),
                       "learning_rate": jnp.float32(i)}, samples=4, flops_per_device=1.0)
  assert [s for s, _ in window.fetch(newest=False)] == [1, 2, 3]  # the check between records
  rec = window.record(window.fetch())
  assert rec["train/loss"] == 1.5 and rec["train/skipped_steps"] == 2 and rec["train/learning_rate"] == 3
  assert "train/skipped" not in rec
  window.reset()
  window.add(5, {"loss": jnp.float32(float("nan")), "skipped": jnp.float32(1.0)}, samples=4, flops_per_device=1.0)
  rec = window.record(window.fetch())
  assert math.isnan(rec["train/loss"]) and rec["train/skipped_steps"] == 1  # nothing else to average


# ------------------------------------------------------------------------------------------------
# Real runs: skipped, counted, and the stop after max_bad_steps consecutive skips. Both runs compile the same
# program (the poisoned steps are the same; max_bad_steps, checkpoint_every and log_every are host-side).

STEPS = 16
BAD = {3: "nan", 5: "inf", 7: "grad", **{s: "nan" for s in range(12, STEPS + 1)}}


def _run(data_dir, workdir, monkeypatch, **train) -> tuple[str, list[int], ml_collections.ConfigDict]:
  """(the TrainingError's message, the steps run, the config) of the tiny run with the BAD steps."""
  cfg = _config(data_dir, steps=STEPS, **train)
  _poison(monkeypatch, BAD)
  ran = []
  add = metrics_lib.TrainWindow.add
  monkeypatch.setattr(metrics_lib.TrainWindow, "add",
                      lambda self, step, *a, **k: (ran.append(step), add(self, step, *a, **k)))
  with pytest.raises(TrainingError) as err:
    loop.train_and_evaluate(cfg, str(workdir))
  monkeypatch.undo()
  return str(err.value), ran, cfg


def _message(step: int, count: int, resume: str) -> str:
  parts = r"(?=[^)]*\bloss=nan\b)(?=[^)]*\bloss_a2b=nan\b)(?=[^)]*\bloss_b2a=nan\b)(?=[^)]*\bgrad_norm=nan\b)[^()]*"
  return (rf"the loss or the gradient norm was not finite at step {step} \({parts}\), the last of {count} "
          rf"consecutive skipped steps \(config\.train\.max_bad_steps={count}; the parameters are those of step "
          rf"{step - count}\); lower config\.train\.learning_rate \(now [^)]+\) or config\.train\.grad_clip_norm "
          rf"\(now [^)]+\) and rerun; {resume}")


def test_non_finite_steps_are_skipped_counted_and_max_bad_steps_in_a_row_stop_the_run(data_dir, tmp_path,
                                                                                    monkeypatch):
  """Every step checkpointed and logged; max_bad_steps=3: the single bad steps 3, 5, 7 are skipped and training
  goes on; 12, 13, 14 in a row stop the run at step 14."""
  message, ran, cfg = _run(data_dir, tmp_path, monkeypatch, log_every=1, checkpoint_every=1, max_bad_steps=3)
  resume = f"a rerun resumes from the checkpoint of step 13 in {re.escape(str(run_lib.checkpoint_dir(tmp_path)))}"
  assert re.fullmatch(_message(14, 3, resume), message), message
  assert ran == list(range(1, 15))
  states = _checkpoints(cfg, tmp_path)
  assert sorted(states) == list(range(1, 14))  # the stop comes before step 14's save
  assert all(_finite(s) for s in states.values())  # 0 checkpoints with non-finite values
  for s in range(2, 14):
    state, before = states[s], states[s - 1]
    assert int(state.step) == s, s
    if s in BAD:  # skipped: the parameters and optimizer state bitwise those of the step before
      assert _same(state.params, before.params) and _same(state.opt_state, before.opt_state), s
    else:  # applied: after a skip the updates go on
      assert not _same(state.params["model"], before.params["model"]), s
      assert not _same(state.opt_state, before.opt_state), s
  records = _records(tmp_path)
  assert {s: r["train/skipped_steps"] for s, r in records.items()} == {s: float(s in BAD) for s in range(1, 14)}
  assert records[3]["train/loss"] == "nan" and records[5]["train/loss"] == "inf"
  assert math.isfinite(records[7]["train/loss"]) and records[7]["train/grad_norm"] == "nan"  # a finite loss
  assert all(math.isfinite(records[s]["train/loss"]) for s in range(1, 12) if s not in BAD)


def test_the_stop_is_found_between_records_within_the_bound(data_dir, tmp_path, monkeypatch):
  """No record or save before the end (log_every = checkpoint_every = 16), max_bad_steps=2: the stop at step 13
  (12, 13 in a row) is found by the check every max_bad_steps steps, which reads the steps before the newest: at
  step 14, within max_bad_steps steps of it."""
  message, ran, _ = _run(data_dir, tmp_path, monkeypatch, log_every=STEPS, checkpoint_every=STEPS, max_bad_steps=2)
  resume = (f"no checkpoint is in {re.escape(str(run_lib.checkpoint_dir(tmp_path)))}: a rerun starts from "
            "scratch")
  assert re.fullmatch(_message(13, 2, resume), message), message
  assert ran == list(range(1, 15)) and max(ran) <= 13 + 2, ran
  assert not (tmp_path / "metrics.jsonl").read_text().strip()  # nothing was logged


# ------------------------------------------------------------------------------------------------
# Evaluators.


def test_nan_embeddings_would_score_full_recall_without_the_check():
  """Why the evaluators must reject them: NaN scores compare false, so every correct item ranks first."""
  assert retrieval.paired_recall_at_k(np.full((8, 8), np.nan)) == {1: 100.0, 5: 100.0, 10: 100.0}


def test_check_finite_counts_the_bad_rows():
  emb = np.ones((10, 4), np.float32)
  emb[[1, 7], 2], emb[4, 0] = np.nan, -np.inf
  with pytest.raises(encode_lib.NonFiniteEmbeddings, match=r"^3 of 10 texts embed to non-finite values"):
    encode_lib.check_finite(emb, "texts")
  assert encode_lib.check_finite(emb[[0, 2, 3]], "texts") is not None


def test_evaluators_reject_non_finite_embeddings(data_dir, tmp_path):
  exp = experiment_lib.build_experiment(tiny.tiny_config(data_dir), tmp_path)
  exp.checkpointer.close()
  evaluators = experiment_lib.build_evaluators(exp)
  assert sorted(evaluators) == ["emoji", "fashion_mnist"]
  params = experiment_lib.initial_state(exp).params["model"]
  results = evaluate.run_evaluators(evaluators, params)  # finite parameters: evaluated as before
  assert all(math.isfinite(v) for r in results.values() for v in r.values()), results
  poisoned = jax.tree.map(lambda x: x * jnp.nan, params)
  for name, ev in evaluators.items():
    with pytest.raises(TrainingError, match=rf"^evaluator config\.evals\.{name}: (\d+) of \1 (images|texts) embed "
                       r"to non-finite values \(NaN or inf\)"):
      evaluate.run_evaluators({name: ev}, poisoned)

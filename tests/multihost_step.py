"""Runs a few train steps of the tiny quickstart model on fixed global batches in one of several processes.

Every process builds the experiment, takes its rows of the same global batches (a seeded function of the step,
whatever the process count), runs the production train step and, in process 0, writes the final params and the
per-step metrics to --out (.npz). tests/test_end_to_end.py runs it as 1 process x 8 devices and as 2 processes x 4
devices (jax.distributed over loopback) and compares the two results.

    python -m tests.multihost_step --data_dir D --workdir W --out O [--coordinator_address H:P --num_processes N
        --process_id I] --cpu_devices 8
"""

import argparse

import numpy as np

STEPS = 3


def global_batch(step: int, batch_size: int, image_size: int, text_len: int, vocab: int) -> dict:
  rng = np.random.default_rng(1000 + step)
  tokens = rng.integers(1, vocab, size=(batch_size, text_len)).astype(np.int32)
  tokens[:, text_len // 2:] *= rng.integers(0, 2, size=(batch_size, 1)).astype(np.int32)  # some padded texts
  return {"image": rng.integers(0, 256, size=(batch_size, image_size, image_size, 3)).astype(np.uint8),
          "text": tokens, "ids": rng.permutation(batch_size).astype(np.int32)}


def main():
  parser = argparse.ArgumentParser()
  for name in ("data_dir", "workdir", "out", "coordinator_address"):
    parser.add_argument(f"--{name}")
  for name in ("num_processes", "process_id", "cpu_devices"):
    parser.add_argument(f"--{name}", type=int)
  args = parser.parse_args()

  from big_embed.parallel import multihost  # pylint: disable=g-import-not-at-top  (before any JAX backend use)
  multihost.initialize(args.coordinator_address, args.num_processes, args.process_id, args.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from big_embed.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import experiment  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.tiny_config(args.data_dir, steps=STEPS)
  exp = experiment.build_experiment(config, args.workdir)
  state = experiment.initial_state(exp)
  train_step = experiment.make_train_step(exp)
  sharding = mesh_lib.batch_sharding(exp.mesh)
  b, p, i = config.train.batch_size, jax.process_count(), jax.process_index()
  metrics = []
  for step in range(STEPS):
    full = global_batch(step, b, config.model.image_size, config.model.max_text_len, exp.tokenizer.vocab_size)
    local = {k: v[i * b // p:(i + 1) * b // p] for k, v in full.items()}
    state, m = train_step(state, {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()})
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  params = multihost_utils.process_allgather(state.params, tiled=True)
  exp.checkpointer.close()
  if i == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in metrics[0]:
      flat[f"metrics/{name}"] = np.array([m[name] for m in metrics])
    np.savez(args.out, **flat)


if __name__ == "__main__":
  main()

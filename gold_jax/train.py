r"""GOLD distillation: `python -m gold_jax.train --config configs/gold.py [--config.KEY=VALUE ...]`.

With no model or data paths the run uses the embedded demo (built on first
use in config.demo.cache_dir). Every config field can be overridden on the
command line; unknown keys and invalid values fail before any work starts.
"""
from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from gold_jax import cli_errors

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/gold.py).", lock_config=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["config"].present:
        raise cli_errors.UserError("--config is required, e.g. --config configs/gold.py")
    path = FLAGS["config"].config_filename
    if not os.path.isfile(path.split(":", 1)[0]):   # ml_collections would report it late, as an OSError
        raise FileNotFoundError(f"--config {path}: no such config file")
    cfg = FLAGS.config
    from gold_jax import config as config_lib
    config_lib.validate(cfg)   # keys and values, before JAX touches any device
    from gold_jax import components   # heavy imports (transformers, models) only after validation
    components.maybe_init_distributed(cfg)
    from gold_jax.trainer import Trainer
    last = Trainer(cfg).run()
    logging.info("done: %s", json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))}))
    print(json.dumps({k: last[k] for k in ("actor/jsd_loss", "eval/jsd_loss", "eval/accuracy") if k in last}))


if __name__ == "__main__":
    cli_errors.run_absl(main)

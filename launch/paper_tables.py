"""docs/TABLES.md: the paper's Tables 1-3 next to the counts of our configs.

  python launch/paper_tables.py > docs/TABLES.md

Summarises every config the tables name (what `--mode=summary` prints, from
jax.eval_shape: no FLOPs spent) and prints gaternet_jax.paper's comparison.
The configs are not part of the installed package, so this script, not the
package, loads them.
"""

import importlib
import os
import sys

# The repository root: where configs/ (and, uninstalled, gaternet_jax/) are.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from gaternet_jax import paper
from gaternet_jax import summary


def summaries() -> dict:
  """{config name: summary.model_summary of configs/<name>.py} of every row
  of the paper's tables."""
  return {
      name: summary.model_summary(
          importlib.import_module(f'configs.{name}').get_config()
      )
      for name in paper.config_names()
  }


if __name__ == '__main__':
  print(paper.tables_markdown(summaries()), end='')

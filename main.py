"""GaterNet in JAX: train, evaluate, analyse, summarise or benchmark a config.

  python main.py --config=configs/default.py --workdir=/tmp/gaternet_demo
  python main.py --config=configs/default.py --workdir=/tmp/gaternet_demo \
      --mode=analyze
  python main.py --config=configs/cifar10_r20.py --mode=summary
  python main.py --config=configs/imagenet_r50_bas.py --mode=speed

Several processes (a Cloud TPU VM pod slice, Slurm, ...) join one job by
themselves; elsewhere give each process --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

import logging as pylogging
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gaternet_jax import cli
from gaternet_jax import distributed
from gaternet_jax import flag_errors
from gaternet_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.DEFINE_enum('mode', 'train', cli.MODES, 'What to do with the config.')
flags.DEFINE_bool(
    'allow_config_change',
    False,
    'Resume a --workdir whose run was trained with other values of fields '
    'that change its trajectory (batch size, seed, schedule, data, ...); '
    'without it that is refused.',
)
flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0, for a multi-process job JAX '
    'does not detect itself (else $JAX_COORDINATOR_ADDRESS).',
)
flags.DEFINE_integer(
    'num_processes', None, 'Processes in the job (else $JAX_NUM_PROCESSES).'
)
flags.DEFINE_integer(
    'process_id',
    None,
    'This process, 0 to num_processes - 1 (else ' '$JAX_PROCESS_ID).',
)
flags.DEFINE_integer(
    'heartbeat_timeout_seconds',
    100,
    'A process silent this long counts as dead, and the job '
    'stops (multi-process runs).',
)


def _parse_flags(argv):
  """absl's flag parsing, with what goes wrong in the --config file, or in
  an override of one of its fields, cut to one sentence."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sentence = flag_errors.config_flag_error(e, argv)
    if sentence is not None:
      sys.exit(f'error: {sentence}')
    if not isinstance(e, flags.Error):
      raise
    # Other flags: absl's own report and exit.
    sys.stderr.write(
        f'FATAL Flags parsing error: {str(e).strip()}\n'
        'Pass --helpshort or --helpfull to see help on flags.\n'
    )
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  try:
    config = FLAGS.config
    if config is not None:
      config.get('data')  # A file that failed to load raises only on use.
  except (OSError, ImportError, SyntaxError) as e:
    reason = str(e).strip().splitlines()[-1].strip()
    sys.exit(f'error: cannot load the --config file ({reason}).')
  if config is None and FLAGS['config'].present:
    path = config_flags.get_config_filename(FLAGS['config'])
    sys.exit(f'error: get_config() of the --config file {path} returned None.')
  if config is None:
    sys.exit(
        'error: --config is required (for example '
        '--config=configs/default.py).'
    )
  if (
      FLAGS.mode in ('train', 'eval', 'analyze', 'compact')
      and not FLAGS.workdir
  ):
    sys.exit(f'error: --workdir is required for --mode={FLAGS.mode}.')
  try:
    # Before any other JAX call: the runtime decides what devices exist.
    distributed.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        FLAGS.heartbeat_timeout_seconds,
    )
  except UserError as e:
    sys.exit(f'error: {e}')
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save at INFO; keep the run's own progress readable.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= pylogging.WARNING
      or '/orbax/' not in record.pathname
  )
  try:
    cli.run(FLAGS.mode, config, FLAGS.workdir, FLAGS.allow_config_change)
  except UserError as e:
    distributed.fail(f'error: {e}')  # Every process of the job stops.
  except Exception as e:  # pylint: disable=broad-except
    if not distributed.is_multiprocess():
      raise
    # A bug or a fault on one process: its traceback here, and the others
    # stop with its one line instead of waiting in the next collective.
    traceback.print_exc()
    distributed.fail(f'error: {type(e).__name__}: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)

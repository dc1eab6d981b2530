"""Cloud TPU VMs for gaternet_jax: create, set up, run, watch and delete.

  python launch/tpu_vm.py create|setup|run|stop|status|logs|delete [flags]

Every step is one or two `gcloud compute tpus ...` commands; --dry_run prints
them (one per line, ready to paste into a shell) and runs nothing. `setup`
and `run` reach every worker of the slice (--worker=all) at once, so the
same commands serve a single host and a pod slice.

Single host, v4-8 (4 chips, 1 host):
  python launch/tpu_vm.py create --name=gn-v4 --zone=us-central2-b \\
      --accelerator_type=v4-8
  python launch/tpu_vm.py setup --name=gn-v4 --zone=us-central2-b
  python launch/tpu_vm.py run --name=gn-v4 --zone=us-central2-b \\
      --config=configs/imagenet_r50.py --workdir=gs://my-bucket/gaternet/r50 \\
      --config.data.data_dir=gs://my-bucket/tensorflow_datasets
  python launch/tpu_vm.py logs --name=gn-v4 --zone=us-central2-b --follow
  python launch/tpu_vm.py delete --name=gn-v4 --zone=us-central2-b

v5e, v5litepod-8 (8 chips, 1 host; its runtime is v2-alpha-tpuv5-lite,
chosen from the accelerator type), as a Spot VM through a queued resource:
  python launch/tpu_vm.py create --name=gn-v5e --zone=us-west4-a \\
      --accelerator_type=v5litepod-8 --spot --queued
  python launch/tpu_vm.py setup --name=gn-v5e --zone=us-west4-a
  python launch/tpu_vm.py run --name=gn-v5e --zone=us-west4-a \\
      --config=configs/imagenet_r18.py --workdir=gs://my-bucket/gaternet/r18
  python launch/tpu_vm.py delete --name=gn-v5e --zone=us-west4-a --queued

Pod slice, v4-32 (16 chips, 4 hosts: one main.py per host, one job):
  python launch/tpu_vm.py create --name=gn-pod --zone=us-central2-b \\
      --accelerator_type=v4-32
  python launch/tpu_vm.py setup --name=gn-pod --zone=us-central2-b
  python launch/tpu_vm.py run --name=gn-pod --zone=us-central2-b \\
      --config=configs/imagenet_r50.py --workdir=gs://my-bucket/gaternet/r50-pod
  python launch/tpu_vm.py status --name=gn-pod --zone=us-central2-b
  python launch/tpu_vm.py logs --name=gn-pod --zone=us-central2-b --worker=0

The workdir is always a gs:// path: the hosts of a slice share no disk, and
a TPU VM's disk goes with it when it is preempted or deleted. main.py resumes
from the latest checkpoint in its workdir, so after a preemption `run` with
the same --workdir continues the run (a Spot VM cannot be restarted: create
and set it up again first). `run` is idempotent: on each worker it first
stops the job it started before (SIGTERM, on which the trainer saves a
checkpoint, then SIGKILL after --stop_timeout_s), then starts main.py
detached, appending to ~/<remote_dir>/logs/<run_name>.log on each worker.

main.py's own flags pass through `run`: --config.* overrides as they are,
anything else after `--` (e.g. `-- --mode=eval`). Write overrides as
--config.key=value (one argument).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ('create', 'setup', 'run', 'stop', 'status', 'logs', 'delete')
LIBTPU_RELEASES = (
    'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
)
# The TPU VM base image of each generation (`gcloud compute tpus tpu-vm
# versions list --zone=...` lists them all).
RUNTIME_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}
# On each worker, relative to the code folder (or home, for the archive).
ARCHIVE = 'gaternet_jax_src.tar.gz'
PID_FILE = 'logs/main.pid'
LATEST_LOG = 'logs/latest.log'
# How often a stopping job is looked at while it writes its checkpoint.
STOP_POLLS_PER_S = 5
# Left out of the archive when the code is not a git checkout (as .gitignore).
SKIPPED = (
    '.git',
    '.venv',
    'venv',
    '__pycache__',
    'build',
    'dist',
    '.pytest_cache',
    'workdirs',
    '.whl',
    '.data',
)

flags.DEFINE_string('name', None, 'TPU VM (node) name.')
flags.DEFINE_string(
    'zone', None, "Zone, e.g. us-central2-b (else gcloud's compute/zone)."
)
flags.DEFINE_string('project', None, "Project (else gcloud's core/project).")
flags.DEFINE_string(
    'accelerator_type',
    'v4-8',
    'create: v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ...',
)
flags.DEFINE_string(
    'runtime_version',
    None,
    'create: TPU VM image; default from the accelerator type '
    '(tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite for '
    'v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e).',
)
flags.DEFINE_bool('spot', False, 'create: a Spot VM (preemptible, cheaper).')
flags.DEFINE_bool('reserved', False, "create: use the project's reservation.")
flags.DEFINE_bool(
    'queued',
    False,
    'create/status/delete: through a queued resource, which '
    'waits for capacity instead of failing.',
)
flags.DEFINE_string(
    'queued_resource_id', None, 'Queued resource name (default: --name).'
)
flags.DEFINE_string(
    'remote_dir',
    'gaternet_jax',
    'Code folder on each worker, relative to its home.',
)
flags.DEFINE_string(
    'jax_package',
    'jax[tpu]',
    'setup: the JAX requirement, e.g. jax[tpu]==0.4.38.',
)
flags.DEFINE_string(
    'config',
    None,
    'run: config file inside this repository, e.g. ' 'configs/imagenet_r50.py.',
)
flags.DEFINE_string(
    'workdir',
    None,
    'run: gs://bucket/path for checkpoints and metrics; a '
    'local path is refused (the hosts of a slice share no '
    "disk, and a VM's disk is lost with the VM).",
)
flags.DEFINE_string(
    'run_name',
    None,
    'run/logs: log name, logs/<run_name>.log (default: the '
    "workdir's last component; logs: the latest run).",
)
flags.DEFINE_integer(
    'stop_timeout_s',
    180,
    'run/stop: seconds a previous job has to checkpoint '
    'after SIGTERM before it is killed.',
)
flags.DEFINE_string('worker', 'all', 'logs: `all` or one worker index.')
flags.DEFINE_bool('follow', False, 'logs: keep printing new lines.')
flags.DEFINE_integer('lines', 100, 'logs: lines of each log to show first.')
flags.DEFINE_bool(
    'dry_run',
    False,
    'Print the gcloud commands, one per line, and run nothing.',
)
FLAGS = flags.FLAGS


class LaunchError(Exception):
  """A mistake in the command line, said in one sentence."""


def parse_flags(argv):
  """absl parses the launcher's flags; main.py's pass through.

  Args:
    argv: sys.argv.

  Returns:
    (positional arguments with the program name, main.py arguments): the
    --config.* overrides and everything after `--`.
  """
  own, rest = argv, []
  if '--' in argv:
    cut = argv.index('--')
    own, rest = argv[:cut], argv[cut + 1 :]
  overrides = [a for a in own[1:] if a.startswith('--config.')]
  own = [a for a in own if a not in overrides]
  return app.parse_flags_with_usage(own), overrides + rest


def _gcloud(*args):
  """A `gcloud compute tpus` command with the zone and project flags."""
  cmd = ['gcloud', 'compute', 'tpus', *args]
  if FLAGS.zone:
    cmd.append(f'--zone={FLAGS.zone}')
  if FLAGS.project:
    cmd.append(f'--project={FLAGS.project}')
  return cmd


def _ssh(script, worker='all'):
  """Runs a one-line bash script on the workers (in their home folders)."""
  return _gcloud(
      'tpu-vm', 'ssh', FLAGS.name, f'--worker={worker}', f'--command={script}'
  )


def _queued_id():
  return FLAGS.queued_resource_id or FLAGS.name


def _runtime_version(accelerator_type):
  """The --runtime_version flag, else the default image of the type."""
  if FLAGS.runtime_version:
    return FLAGS.runtime_version
  match = re.fullmatch(r'(v\d+[a-z]*)-\d+', accelerator_type)
  if not match or match.group(1) not in RUNTIME_VERSIONS:
    raise LaunchError(
        f'no default --runtime_version for --accelerator_type='
        f'{accelerator_type}; pass one (gcloud compute tpus tpu-vm versions '
        f'list lists them).'
    )
  return RUNTIME_VERSIONS[match.group(1)]


def create_commands():
  """`tpu-vm create`, or `queued-resources create` with --queued."""
  if FLAGS.spot and FLAGS.reserved:
    raise LaunchError('--spot and --reserved exclude each other.')
  version = _runtime_version(FLAGS.accelerator_type)
  tier = ['--spot'] if FLAGS.spot else ['--reserved'] if FLAGS.reserved else []
  if FLAGS.queued:
    return [
        _gcloud(
            'queued-resources',
            'create',
            _queued_id(),
            f'--node-id={FLAGS.name}',
            f'--accelerator-type={FLAGS.accelerator_type}',
            f'--runtime-version={version}',
            *tier,
        )
    ]
  return [
      _gcloud(
          'tpu-vm',
          'create',
          FLAGS.name,
          f'--accelerator-type={FLAGS.accelerator_type}',
          f'--version={version}',
          *tier,
      )
  ]


def _source_files():
  """Paths, relative to the repository, of the files `setup` ships.

  git's tracked files plus untracked ones it does not ignore (a new config
  not yet added), else the whole tree less SKIPPED.
  """
  try:
    out = subprocess.run(
        ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    names = sorted(set(os.fsdecode(out).split('\0')) - {''})
  except (OSError, subprocess.CalledProcessError):
    names = []
    for root, dirs, files in os.walk(REPO):
      dirs[:] = sorted(
          d for d in dirs if d not in SKIPPED and not d.endswith('.egg-info')
      )
      names += [
          os.path.relpath(os.path.join(root, f), REPO) for f in sorted(files)
      ]
  # A tracked file deleted in the working tree is not shipped.
  return [n for n in names if os.path.isfile(os.path.join(REPO, n))]


def pack_sources(folder):
  """Writes the repository's files to folder/ARCHIVE; returns its path."""
  path = os.path.join(folder, ARCHIVE)
  with tarfile.open(path, 'w:gz') as tar:
    for name in _source_files():
      try:
        tar.add(os.path.join(REPO, name), arcname=name, recursive=False)
      except FileNotFoundError:  # Removed while packing (an editor's temp).
        continue
  return path


def setup_commands(archive):
  """Copies `archive` to every worker, unpacks it, installs a virtualenv."""
  q = shlex.quote
  venv = (
      '{ [ -x .venv/bin/pip ] || python3 -m venv .venv || '
      '{ sudo apt-get update -q && sudo apt-get install -y -q python3-venv'
      ' && rm -rf .venv && python3 -m venv .venv; }; }'
  )
  script = ' && '.join(
      [
          f'mkdir -p {q(FLAGS.remote_dir)}',
          f'tar -xzf {ARCHIVE} -C {q(FLAGS.remote_dir)}',
          f'rm -f {ARCHIVE}',
          f'cd {q(FLAGS.remote_dir)}',
          venv,
          '.venv/bin/pip install -q -U pip',
          f'.venv/bin/pip install -U {q(FLAGS.jax_package)} -f {LIBTPU_RELEASES}',
          f'.venv/bin/pip install -e {q(".[tf,gcs]")}',
          (
              '.venv/bin/python -c '
              + q('import jax, gaternet_jax; ' 'print("jax", jax.__version__)')
          ),
      ]
  )
  return [
      _gcloud(
          'tpu-vm', 'scp', archive, f'{FLAGS.name}:{ARCHIVE}', '--worker=all'
      ),
      _ssh(script),
  ]


def _stop_script():
  """Bash: stops the job PID_FILE names (its process group), if running,
  and returns once it has ended.

  The check reads /proc/<pid>/cmdline, so a stale pid file (after a reboot)
  never names an unrelated process, and a zombie counts as stopped.
  """
  running = 'grep -qa main.py /proc/"$pid"/cmdline 2>/dev/null'
  return (
      f'{{ pid=$(cat {PID_FILE} 2>/dev/null); if {running}; then '
      'echo "$(hostname): stopping main.py (pid $pid)"; '
      'kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"; '
      f'for _ in $(seq {STOP_POLLS_PER_S * FLAGS.stop_timeout_s}); do '
      f'{running} || break; sleep {1 / STOP_POLLS_PER_S}; done; '
      f'if {running}; then kill -KILL -- "-$pid" 2>/dev/null || '
      'kill -KILL "$pid"; '
      # A killed process ends when it next runs: wait for that too.
      f'for _ in $(seq {STOP_POLLS_PER_S * 5}); do '
      f'{running} || break; sleep {1 / STOP_POLLS_PER_S}; done; fi; '
      f'fi; rm -f {PID_FILE}; }}'
  )


def _check_run_flags():
  """The config and workdir `run` needs, checked before anything runs."""
  if not FLAGS.config:
    raise LaunchError(
        'run needs --config (for example ' '--config=configs/imagenet_r50.py).'
    )
  config_file = FLAGS.config.split(':')[0]
  if os.path.isabs(config_file) or not os.path.isfile(
      os.path.join(REPO, config_file)
  ):
    raise LaunchError(
        f'--config={FLAGS.config} is not a file of this '
        f'repository (the workers run the copy setup made).'
    )
  if not FLAGS.workdir:
    raise LaunchError('run needs --workdir=gs://bucket/path.')
  if not re.fullmatch(r'gs://[^/]+(/.*)?', FLAGS.workdir):
    raise LaunchError(
        f'--workdir must be a gs:// path (for example gs://my-bucket/gaternet'
        f'/r50), not {FLAGS.workdir!r}: the hosts of a slice share no disk '
        f"and a TPU VM's disk is lost when it is preempted or deleted."
    )


def _log_name(run_name):
  """logs/<run_name>.log, the name made safe for a file."""
  return 'logs/' + re.sub(r'[^A-Za-z0-9._-]', '_', run_name) + '.log'


def run_commands(main_args):
  """Starts main.py on every worker, detached, after stopping the last job.

  Args:
    main_args: main.py arguments after --config and --workdir.
  """
  _check_run_flags()
  q = shlex.quote
  log = _log_name(FLAGS.run_name or FLAGS.workdir.rstrip('/').split('/')[-1])
  job = [
      '.venv/bin/python',
      'main.py',
      f'--config={FLAGS.config}',
      f'--workdir={FLAGS.workdir}',
      *main_args,
  ]
  # setsid: its own process group and session, so the job outlives the ssh
  # session and _stop_script can signal all of it.
  start = (
      f'{{ setsid nohup {shlex.join(job)} >> {q(log)} 2>&1 ' '< /dev/null & }'
  )
  script = ' && '.join(
      [
          f'cd {q(FLAGS.remote_dir)}',
          'mkdir -p logs',
          _stop_script(),
          f'ln -sfn {q(os.path.basename(log))} {LATEST_LOG}',
          f'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) start" >> '
          f'{q(log)}',
          start,
          f'echo $! > {PID_FILE}',
          f'echo "$(hostname): started main.py (pid $!), log '
          f'~/{FLAGS.remote_dir}/{log}"',
      ]
  )
  return [_ssh(script)]


def stop_commands():
  script = f'cd {shlex.quote(FLAGS.remote_dir)} && {_stop_script()}'
  return [_ssh(script)]


def status_commands():
  """The VM's (or queued resource's) state, then main.py on each worker."""
  if FLAGS.queued:
    describe = _gcloud('queued-resources', 'describe', _queued_id())
  else:
    describe = _gcloud('tpu-vm', 'describe', FLAGS.name)
  script = (
      f'cd {shlex.quote(FLAGS.remote_dir)} 2>/dev/null && '
      f'pid=$(cat {PID_FILE} 2>/dev/null) && '
      'grep -qa main.py /proc/"$pid"/cmdline 2>/dev/null && '
      'echo "$(hostname): main.py running (pid $pid): '
      f'$(tail -n 1 {LATEST_LOG} | cut -c -200)" || '
      'echo "$(hostname): main.py not running"'
  )
  return [describe, _ssh(script)]


def logs_commands():
  log = _log_name(FLAGS.run_name) if FLAGS.run_name else LATEST_LOG
  tail = [
      'tail',
      '-n',
      str(FLAGS.lines),
      *(['-F'] if FLAGS.follow else []),
      log,
  ]
  script = (
      f'cd {shlex.quote(FLAGS.remote_dir)} && {shlex.join(tail)} | '
      'sed -u "s/^/$(hostname): /"'
  )
  return [_ssh(script, FLAGS.worker)]


def delete_commands():
  """Deletes the VM; --queued deletes its queued resource with it."""
  if FLAGS.queued:
    return [
        _gcloud(
            'queued-resources', 'delete', _queued_id(), '--force', '--quiet'
        )
    ]
  return [_gcloud('tpu-vm', 'delete', FLAGS.name, '--quiet')]


def execute(commands):
  """Prints (--dry_run) or runs the commands in turn; stops at a failure."""
  for cmd in commands:
    if FLAGS.dry_run:
      print(shlex.join(cmd), flush=True)
      continue
    code = subprocess.run(cmd, check=False).returncode
    if code:
      raise LaunchError(
          f'`{shlex.join(cmd[:5])} ...` failed (exit code ' f'{code}).'
      )


def _require_gcloud():
  if not FLAGS.dry_run and shutil.which('gcloud') is None:
    raise LaunchError(
        'gcloud is not on PATH; install the Google Cloud CLI '
        '(https://cloud.google.com/sdk/docs/install), or pass '
        '--dry_run to print the commands.'
    )


def launch(command, main_args):
  """Builds and executes one subcommand's gcloud commands."""
  if command not in COMMANDS:
    raise LaunchError(
        f'give one command: {", ".join(COMMANDS)} (see ' f'--help).'
    )
  if not FLAGS.name:
    raise LaunchError('--name (the TPU VM) is required.')
  if not re.fullmatch(r'[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*', FLAGS.remote_dir):
    raise LaunchError(
        f'--remote_dir={FLAGS.remote_dir} must be a plain path '
        f"relative to the workers' home folders."
    )
  if main_args and command != 'run':
    raise LaunchError(f'main.py flags ({main_args[0]}) go with run only.')
  if command == 'setup':
    _require_gcloud()
    if FLAGS.dry_run:  # Kept, so that the printed scp command works.
      execute(setup_commands(pack_sources(tempfile.mkdtemp())))
    else:
      with tempfile.TemporaryDirectory() as folder:
        execute(setup_commands(pack_sources(folder)))
    return
  builders = {
      'create': create_commands,
      'stop': stop_commands,
      'status': status_commands,
      'logs': logs_commands,
      'delete': delete_commands,
      'run': lambda: run_commands(main_args),
  }
  commands = builders[command]()
  _require_gcloud()
  execute(commands)


def main(parsed):
  argv, main_args = parsed
  try:
    launch(argv[1] if len(argv) == 2 else None, main_args)
  except LaunchError as e:
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:  # Ctrl-C ends `logs --follow`.
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

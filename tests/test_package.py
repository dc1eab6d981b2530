"""The installed package stands alone: it never imports the top-level
`configs` package, which setup.cfg does not install."""

import ast
import glob
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports every module of the package with `configs` made unimportable, then
# prints the modules that asked for it. A finder, rather than leaving the
# repository off sys.path, because an editable install can put a checkout
# (and its configs/) on the path anyway.
_SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, sys

    asked = []

    class NoConfigs:
      def find_spec(self, name, path=None, target=None):
        if name == 'configs' or name.startswith('configs.'):
          asked.append(name)
          raise ImportError(f'the package imported {name}')
        return None

    sys.meta_path.insert(0, NoConfigs())
    sys.path.insert(0, sys.argv[1])
    import gaternet_jax
    assert gaternet_jax.__file__.startswith(sys.argv[1]), gaternet_jax.__file__
    failed = []
    for info in pkgutil.walk_packages(gaternet_jax.__path__, 'gaternet_jax.'):
      try:
        importlib.import_module(info.name)
      except ImportError as e:
        failed.append(f'{info.name}: {e}')
    print('asked:', sorted(set(asked)))
    print('failed:', failed)
""")


def test_package_never_imports_configs(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)
  proc = subprocess.run(
      [sys.executable, '-c', _SCRIPT, REPO],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'asked: []' in proc.stdout, proc.stdout
  assert 'failed: []' in proc.stdout, proc.stdout


def _leading_text(node):
  """The literal start of a str or f-string expression, else ''."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value
  if isinstance(node, ast.JoinedStr) and node.values:
    return _leading_text(node.values[0])
  return ''


def test_package_source_names_no_configs_import():
  # Imports inside functions run only when called: read every module for
  # `import configs...` and import_module('configs...') / __import__.
  found = []
  for path in glob.glob(
      os.path.join(REPO, 'gaternet_jax', '**', '*.py'), recursive=True
  ):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module or '']
      elif isinstance(node, ast.Call) and node.args:
        func = node.func
        called = getattr(func, 'attr', getattr(func, 'id', ''))
        if called in ('import_module', '__import__'):
          names = [_leading_text(node.args[0])]
      found += [
          f'{os.path.relpath(path, REPO)}:{node.lineno} {n}'
          for n in names
          if n.split('.')[0] == 'configs'
      ]
  assert not found, found

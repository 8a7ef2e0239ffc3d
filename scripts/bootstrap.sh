# Sourced by scripts/dev, scripts/test and scripts/lock: makes .venv from requirements.lock (exact versions,
# checked against their hashes), then adds the project itself in editable mode. It installs with uv (pinned,
# with hashes, in scripts/installer.lock), which takes seconds where pip takes minutes. It installs again
# only when a lock or pyproject.toml changed. Needs nothing but Python >= 3.11 (PYTHON picks which one).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Python 3.11 or newer is needed as '$PYTHON' (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
if [ -e .venv ] && [ "$(python_version .venv/bin/python)" != "$(python_version "$PYTHON")" ]; then
  echo "recreating .venv for Python $(python_version "$PYTHON") ($PYTHON)" >&2
  rm -rf .venv
fi
stamp=".venv/.installed-$(cat scripts/installer.lock requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  if compgen -G '.venv/.installed-*' >/dev/null; then
    echo "a lock file or pyproject.toml changed: updating .venv" >&2
  else
    echo "first run: installing dependencies into .venv, usually under a minute" >&2
  fi
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # uv reads neither pip.conf nor PIP_* (mirrors, wheel folders, certificates): where it cannot install
  # the lock, pip does, as slowly as it always did. uv only as a wheel: building it would need Rust.
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --quiet --only-binary :all: \
           --require-hashes -r scripts/installer.lock \
         && .venv/bin/uv pip install --python .venv/bin/python --require-hashes -r requirements.lock; }; then
    echo "uv could not install requirements.lock: installing it with pip, a few minutes" >&2
    .venv/bin/python -m pip install --disable-pip-version-check --require-hashes -r requirements.lock
  fi
  # The build backend is in the lock: no unpinned download to install the project itself.
  .venv/bin/python -m pip install --disable-pip-version-check --quiet --no-deps --no-build-isolation --editable .
  rm -f .venv/.installed-*
  touch "$stamp"
fi

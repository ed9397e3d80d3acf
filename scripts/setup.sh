#!/usr/bin/env bash
# Install everything GrandModel Ops needs on a Debian 12 machine, as root. Safe to re-run: each
# step is skipped when already done.
#   1. Debian packages (podman, runc, iptables, debootstrap, python3-venv, ...), podman
#      configuration, the sandbox SSH key and the systemd Debian 12 base image for sandbox/molecule
#      hosts (scripts/sandbox.py prepare)
#   2. a self-check that this machine can run the suite (scripts/sandbox.py doctor)
#   3. the project virtualenv .venv with the pinned Python dependencies (requirements.txt)
#   4. the service wheelhouse that both commands ship to app hosts (scripts/build_release.py)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
# Run a long, quiet command with a heartbeat every 30 s, so minutes of pip look like work.
beat() {
  local what=$1 started=$SECONDS; shift
  "$@" & local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && say "... still $what ($(( SECONDS - started ))s)"
  done
  wait "$pid"
}

[ "$(id -u)" -eq 0 ] || die "run as root: sandbox hosts are rootful podman containers with systemd"
[ -r /etc/debian_version ] || die "this set-up expects Debian 12 (apt, debootstrap)"
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3; }

python3 scripts/sandbox.py prepare
if [ "${GM_SKIP_DOCTOR:-0}" != 1 ]; then
  python3 scripts/sandbox.py doctor
fi

stamp=.venv/.requirements.sha256
want=$(cat requirements.txt model_service/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "virtualenv .venv is current"
else
  say "installing Python dependencies into .venv (first run: a few minutes)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  beat "upgrading pip" .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  beat "installing requirements.txt (ansible, molecule, torch 2.13.0 CPU, ...)" \
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
  say "virtualenv ready: $(.venv/bin/ansible --version | head -1)"
fi
.venv/bin/python scripts/check_collections.py

# Galaxy's importer (scripts/galaxy_import_check.py, a step of make test) in its own virtualenv: it pins
# attrs<24, older than what the tools of .venv need.
gstamp=.venv-galaxy/.requirements.sha256
gwant=$(sha256sum requirements-galaxy.txt | cut -d' ' -f1)
if ! { [ -x .venv-galaxy/bin/python ] && [ -f "$gstamp" ] && [ "$(cat "$gstamp")" = "$gwant" ]; }; then
  [ -x .venv-galaxy/bin/python ] || python3 -m venv .venv-galaxy
  beat "installing requirements-galaxy.txt (galaxy-importer) into .venv-galaxy" \
    .venv-galaxy/bin/pip install -q --disable-pip-version-check -r requirements-galaxy.txt
  echo "$gwant" > "$gstamp"
fi

# ansible-test bootstraps pip in its sanity virtualenvs from a URL our networks cannot reach:
# give it the offline stand-in under the cached name it looks for.
pip_ver=$(.venv/bin/python - <<'PY'
import pathlib, re, ansible_test
src = pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
print(re.search(r"pip='([0-9.]+)'", src.read_text()).group(1))
PY
)
cache="$HOME/.ansible/test/cache/get_pip_${pip_ver//./_}.py"
if ! cmp -s scripts/ansible_test_get_pip.py "$cache"; then
  install -D -m 0644 scripts/ansible_test_get_pip.py "$cache"
  say "installed the offline pip bootstrap for ansible-test at $cache"
fi

# The inference service's offline wheelhouse (torch CPU included): both commands ship it to app
# hosts (make demo, the rollout scenario of make test). Skipped when current for this source.
.venv/bin/python scripts/build_release.py --wheelhouse-only

#!/usr/bin/env bash
# The main job on the embedded default: create the sandbox hosts (local podman containers running
# systemd) and deploy the whole stack onto them with site.yml, then say where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_NOCOLOR="${ANSIBLE_NOCOLOR:-1}"
inventory=inventories/sandbox
started=$(date +%s)

echo "== 1/3 sandbox hosts ($inventory) =="
.venv/bin/python scripts/sandbox.py up -i "$inventory"

echo "== 2/3 release 2026.11.0 and ansible-playbook site.yml -i $inventory =="
.venv/bin/python scripts/build_release.py --version 2026.11.0
ansible-playbook site.yml -i "$inventory" "$@"

echo "== 3/3 where to look =="
.venv/bin/python scripts/sandbox.py list
cat <<TXT

Deployed in $(( $(date +%s) - started ))s. Next:
  curl -s http://127.0.0.1:18080/version             the inference service through the nginx front door
  curl -sk https://127.0.0.1:18443/version           the same over TLS (self-signed)
  ansible-playbook playbooks/rollout.yml -e release_version=2026.11.1   a blue-green release
  ansible-playbook playbooks/switch_back.yml         traffic back to the warm colour in seconds
  ansible-playbook playbooks/rollback.yml            the same, then the record (and starts the colour if needed)
  podman exec -it gm-sbx-app1 bash                  a shell on a sandbox host
  ansible all -i $inventory -m ansible.builtin.ping  reach every host
  ansible-playbook site.yml -i $inventory --check --diff   nothing should change
  (build release 2026.11.1 first: .venv/bin/python scripts/build_release.py --version 2026.11.1 --seed 8)
  make sandbox-down                                  remove the sandbox hosts
TXT

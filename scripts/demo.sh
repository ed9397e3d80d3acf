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

echo "== 2/3 ansible-playbook site.yml -i $inventory =="
ansible-playbook site.yml -i "$inventory" "$@"

echo "== 3/3 where to look =="
.venv/bin/python scripts/sandbox.py list
cat <<TXT

Deployed in $(( $(date +%s) - started ))s. Next:
  podman exec -it gm-sbx-app1 bash                  a shell on a sandbox host
  ansible all -i $inventory -m ansible.builtin.ping  reach every host
  ansible-playbook site.yml -i $inventory --check --diff   nothing should change
  make sandbox-down                                  remove the sandbox hosts
TXT

#!/bin/sh
# ssh ProxyCommand for Molecule hosts: speaks SSH to a podman container without a network path.
# Usage (in ansible_ssh_common_args): -o ProxyCommand="sh scripts/molecule_ssh_proxy.sh %h KEY.pub"
# It authorises the project's generated key inside the container, then runs one sshd in inetd mode
# whose stdin/stdout are this connection. With ControlPersist, one such sshd serves a whole play, so
# a task costs one round trip on the multiplexed connection instead of several `podman exec` calls.
set -eu
host=$1
pubkey=$(cat "$2")
podman exec "$host" sh -c '
  set -e
  umask 077
  mkdir -p /root/.ssh /run/sshd
  chmod 0755 /run/sshd
  grep -qxF "$1" /root/.ssh/authorized_keys 2>/dev/null || printf "%s\n" "$1" >> /root/.ssh/authorized_keys
  ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A >/dev/null
' sh "$pubkey"
exec podman exec -i "$host" /usr/sbin/sshd -i -e -o LogLevel=ERROR

"""Verify the platform tier on a container host: Docker engine and kubeadm node preparation.

Real state only: the packages dpkg knows, the daemons answering on their sockets, the files
they read, the live sysctls in the container's network namespace and the kubeadm configuration
parsed and checked field by field (kubeadm itself is not installable here).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

# podman exec is several times faster than an Ansible round trip per check.
testinfra_hosts = ["ansible://gm-mol-platform"]

SCENARIO_DIR = Path(__file__).resolve().parent.parent


def test_docker_engine_from_debian(host):
    assert host.package("docker.io").is_installed
    assert host.package("docker.io").version.startswith("20.10")


def test_daemon_json_from_data(host):
    conf = host.file("/etc/docker/daemon.json")
    assert conf.user == "root" and conf.mode == 0o644
    data = json.loads(conf.content_string)
    assert data == {
        "exec-opts": ["native.cgroupdriver=systemd"],
        "live-restore": True,
        "log-driver": "json-file",
        "log-opts": {"max-file": "5", "max-size": "100m"},
        "max-concurrent-downloads": 4,
        "storage-driver": "vfs",
    }


def test_dockerd_runs_with_the_configured_daemon_settings(host):
    # dockerd runs in this non-privileged container (vfs storage): ask the daemon itself.
    svc = host.service("docker")
    assert svc.is_running and svc.is_enabled
    info = json.loads(host.check_output("docker info --format '{{json .}}'"))
    assert info["CgroupDriver"] == "systemd"
    assert info["LiveRestoreEnabled"] is True
    assert info["LoggingDriver"] == "json-file"
    assert info["Driver"] == "vfs"


def test_docker_users_in_docker_group(host):
    assert "docker" in host.user("gmdeploy").groups
    # The group grants the daemon socket.
    sock = host.file("/run/docker.sock")
    assert sock.is_socket and sock.group == "docker"


def test_containerd_uses_the_systemd_cgroup_driver(host):
    conf = host.file("/etc/containerd/config.toml")
    assert conf.contains("SystemdCgroup = true")
    # containerd parses the file and reports the effective configuration.
    dump = host.check_output("containerd --config /etc/containerd/config.toml config dump")
    assert "SystemdCgroup = true" in dump
    assert 'sandbox_image = "registry.k8s.io/pause:3.9"' in dump
    assert host.service("containerd").is_running and host.service("containerd").is_enabled
    assert "Revision" in host.check_output("ctr --address /run/containerd/containerd.sock version")


def test_kernel_modules_configured_not_loaded_from_a_container(host):
    conf = host.file("/etc/modules-load.d/kubernetes.conf")
    modules = [line for line in conf.content_string.splitlines() if line and not line.startswith("#")]
    assert modules == ["overlay", "br_netfilter"]
    # The role saw the container and left module loading to a real host, and says so.
    report = json.loads(host.check_output("cat /var/lib/grandmodel/kubernetes_node_report.json"))
    assert report["container"] is True
    assert all("skipped (a container shares its host kernel" in m for m in report["modules"]), report
    assert "net.ipv4.ip_forward = 1" in report["sysctls_live"]


def test_kubernetes_sysctls_persisted_and_in_effect(host):
    conf = host.file("/etc/sysctl.d/99-kubernetes.conf")
    for line in ("net.bridge.bridge-nf-call-iptables = 1", "net.bridge.bridge-nf-call-ip6tables = 1",
                 "net.ipv4.ip_forward = 1"):
        assert conf.contains(f"^{line}$"), line
    # Live values in the container's own network namespace.
    assert host.check_output("sysctl -n net.ipv4.ip_forward") == "1"
    assert host.check_output("sysctl -n net.bridge.bridge-nf-call-iptables") == "1"


def test_no_swap_entry_left_active(host):
    fstab = host.file("/etc/fstab").content_string
    assert not [line for line in fstab.splitlines()
                if line.split() and not line.startswith("#") and len(line.split()) > 2 and line.split()[2] == "swap"]


def test_kubeadm_configuration_is_complete_and_consistent(host):
    conf = host.file("/etc/kubernetes/kubeadm-config.yaml")
    assert conf.user == "root" and conf.mode == 0o600
    docs = {d["kind"]: d for d in yaml.safe_load_all(conf.content_string) if d}
    assert set(docs) == {"InitConfiguration", "ClusterConfiguration", "KubeletConfiguration"}
    assert docs["InitConfiguration"]["apiVersion"] == "kubeadm.k8s.io/v1beta3"
    assert docs["InitConfiguration"]["nodeRegistration"]["criSocket"] == "unix:///run/containerd/containerd.sock"
    cluster = docs["ClusterConfiguration"]
    assert cluster["apiVersion"] == "kubeadm.k8s.io/v1beta3"
    assert cluster["kubernetesVersion"] == "v1.30.4"
    assert cluster["controlPlaneEndpoint"] == "k8s-api.grandmodel.internal:6443"
    pods = ipaddress.ip_network(cluster["networking"]["podSubnet"])
    services = ipaddress.ip_network(cluster["networking"]["serviceSubnet"])
    assert not pods.overlaps(services)
    kubelet = docs["KubeletConfiguration"]
    assert kubelet["apiVersion"] == "kubelet.config.k8s.io/v1beta1"
    assert kubelet["cgroupDriver"] == "systemd"  # same driver as containerd and dockerd
    assert kubelet["failSwapOn"] is True


def test_cluster_was_not_initialised_with_the_switch_off(host):
    assert not host.file("/etc/kubernetes/admin.conf").exists
    assert not host.exists("kubeadm")  # the Kubernetes apt repository is off in this scenario


def test_tier_reports_host_tuning(host):
    data = json.loads(host.check_output("cat /var/lib/grandmodel/host_tuning_report.json"))
    assert data["container"] is True and data["counts"]["applied"] > 0


BAD_INPUTS = [
    pytest.param({"role_under_test": "docker", "docker_source": "snap"}, "docker_source", id="docker-source"),
    pytest.param({"role_under_test": "docker", "docker_daemon_options": {"live-restore": False}},
                 "use the role inputs for those", id="docker-owned-key"),
    pytest.param({"role_under_test": "kubernetes", "kubernetes_version": "v1.30"}, "must be a full release",
                 id="k8s-version"),
    pytest.param({"role_under_test": "kubernetes", "kubernetes_pod_subnet": "10.96.0.0/12"},
                 "must be distinct IPv4 CIDRs", id="k8s-subnets"),
]


@pytest.mark.parametrize(("extra_vars", "message"), BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(extra_vars, message):
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO_DIR / "invalid_input.yml"),
         "-e", json.dumps(extra_vars)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert message in output, output

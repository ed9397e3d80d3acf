"""No secret in any output: every task that handles a token, password or key carries `no_log: true`.

The scan reads every task of every role (tasks and handlers, blocks included) and every playbook.
A task is secret-bearing when its module arguments (or its loop) name a secret variable, or its
command uses a word that prints or takes a credential (kubeadm tokens, join commands,
--upload-certs, certificate keys). Such a task must set `no_log: true` (a block's no_log covers its
tasks), unless ALLOWED says why its arguments and output cannot hold the secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COLLECTION = REPO / "ansible_collections" / "quantnova" / "grandmodel"

# Variable names and command words that carry a credential.
SECRET = re.compile(
    r"password|passwd|passphrase|secret|token|private_key|api_key|apikey|vault_|credential"
    r"|--upload-certs|certificate[-_]key|kubeadm join|join[-_]command|_join\b|client_key|bcrypt|htpasswd",
    re.IGNORECASE,
)
# Task keywords that are not module arguments (a task's name may say "password" freely).
KEYWORDS = {
    "name", "when", "tags", "register", "notify", "listen", "changed_when", "failed_when", "become",
    "become_user", "delegate_to", "run_once", "check_mode", "diff", "loop_control", "retries", "delay",
    "until", "ignore_errors", "environment", "vars", "args", "no_log", "throttle", "timeout", "any_errors_fatal",
    "module_defaults", "collections", "connection", "delegate_facts", "ignore_unreachable", "local_action",
}
STRUCTURE = ("block", "rescue", "always")

# (file relative to the collection or repository, task name) -> why the task cannot leak a secret.
ALLOWED: dict[tuple[str, str], str] = {
    ("roles/common/tasks/account.yml", "Ensure the service account exists with no login shell"):
        'password: "!" is the lock marker, not a secret',
    ("roles/common/tasks/admins.yml", "Ensure each admin user exists with a locked password, or is removed"):
        'password: "!" is the lock marker; admins have no password',
    ("roles/common/tasks/admins.yml", "Read the accounts and groups that exist"):
        "getent passwd and group give names and ids; password hashes live in shadow, not read",
    ("roles/common/tasks/preflight.yml", "Assert the admin users are well formed"):
        "checks public keys only and prints no key in its message",
    ("roles/common/tasks/sshd.yml", "Assert no other sshd configuration overrides the hardening"):
        "sshd -T setting names (passwordauthentication), not a password",
    ("roles/model_service/tasks/preflight.yml", "Assert the service account exists"):
        "getent passwd returns the account's passwd entry (no hash: those are in shadow)",
    ("roles/model_service/tasks/preflight.yml", "Stop when the service account is missing"):
        "reads getent_passwd (name, uid, shell), no password hash",
    ("roles/postgresql/tasks/restore.yml", "Restore the database from the dump in one transaction"):
        "--no-password only forbids a prompt; peer authentication as postgres, no secret in argv",
    ("roles/pgbackrest/tasks/preflight.yml", "Assert the object store repository is fully described when it is on"):
        "says only whether the object store's key and secret are set or empty, never their values",
    ("roles/redis/tasks/preflight.yml", "Assert the application ACL rules grant no password or user changes"):
        "checks that the ACL rules hold no password; prints the rules, which it has just proved hold none",
    ("roles/redis/tasks/restore.yml", "Fail with what went wrong"):
        "names the variable redis_admin_password in its advice, never its value",
    ("roles/rollout/tasks/k8s_plan.yml", "Assert the gates can reach both colours"):
        "says whether a token was found ('a token' / 'no token'), never prints the headers",
    ("playbooks/runbooks/access_review.yml", "Read sudoers, the accounts and their password state"):
        "password state is passwd -S's status letter (P/L/NP); sudoers lines name users, never hashes",
    ("playbooks/runbooks/access_review.yml", "Keep the sudoers entries and the login accounts"):
        "keeps the status letter under the key 'password'; /etc/shadow is never read",
    ("playbooks/runbooks/access_review.yml", "Write the report for people"):
        "the report lists account names and password status letters; the secrets are masked before it",
    ("playbooks/runbooks/security_check.yml", "Find world-readable files under the secret paths"):
        "prints the paths of world-readable files under the secret folders, never their contents",
    ("playbooks/runbooks/security_check.yml", "Keep this host's findings"):
        "keeps those paths and the listeners; no file content is read",
    ("playbooks/awx_apply.yml", "Ensure the project (this repository) exists and is synced"):
        "credential is the NAME of an AWX credential object; the secret stays in AWX",
    ("playbooks/awx_apply.yml", "Ensure the job templates exist with their surveys"):
        "credentials are NAMES of AWX credential objects; the secrets stay in AWX",
}


def task_files() -> Iterator[Path]:
    roles = COLLECTION / "roles"
    yield from sorted(roles.glob("*/tasks/*.yml"))
    yield from sorted(roles.glob("*/handlers/*.yml"))
    yield from sorted((COLLECTION / "playbooks").rglob("*.yml"))
    yield from sorted((REPO / "playbooks").rglob("*.yml"))
    yield REPO / "site.yml"


def label(path: Path) -> str:
    base = COLLECTION if path.is_relative_to(COLLECTION) else REPO
    return str(path.relative_to(base))


def tasks_of(document: Any) -> Iterator[tuple[dict[str, Any], bool]]:
    """Every task of a tasks file or playbook, with whether an enclosing play or block sets no_log."""
    def walk(items: Any, inherited: bool) -> Iterator[tuple[dict[str, Any], bool]]:
        for item in items or []:
            if not isinstance(item, dict):
                continue
            covered = inherited or item.get("no_log") is True
            if any(key in item for key in STRUCTURE):
                for key in STRUCTURE:
                    yield from walk(item.get(key), covered)
            elif "hosts" in item or "import_playbook" in item or "ansible.builtin.import_playbook" in item:
                for key in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                    yield from walk(item.get(key), covered)
            else:
                yield item, covered
    yield from walk(document if isinstance(document, list) else [], False)


# Modules that render a template (src) whose expressions --diff prints.
TEMPLATE_MODULES = {"template", "ansible.builtin.template", "quantnova.grandmodel.managed_file"}
JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)


def template_source(path: Path, task: dict[str, Any]) -> str:
    """The Jinja expressions of the template a template task renders (--diff prints what they give)."""
    for module in TEMPLATE_MODULES & set(task):
        args = task[module]
        src = args.get("src", "") if isinstance(args, dict) else ""
        for candidate in (path.parent.parent / "templates" / src, path.parent / "templates" / src):
            if src and "{{" not in src and candidate.is_file():
                return " ".join(JINJA.findall(candidate.read_text()))
    return ""


def secret_words(path: Path, task: dict[str, Any]) -> list[str]:
    """The secret-looking words in a task's module arguments and loop (not its name or keywords), and in
    the expressions of the template it renders (a secret there shows in --diff)."""
    text = " ".join(yaml.safe_dump(value) for key, value in task.items() if key not in KEYWORDS)
    text += " " + template_source(path, task)
    return sorted({match.group(0).lower() for match in SECRET.finditer(text)})


def findings() -> list[tuple[str, str, list[str], bool]]:
    found = []
    for path in task_files():
        for task, covered in tasks_of(yaml.safe_load(path.read_text())):
            words = secret_words(path, task)
            if words:
                found.append((label(path), str(task.get("name", "<unnamed>")), words, covered))
    return found


FINDINGS = findings()


def test_the_scan_sees_the_known_secret_tasks() -> None:
    """Guards the scanner itself: it must find the kubeadm credential tasks and the database passwords."""
    names = {(path, name) for path, name, _words, _covered in FINDINGS}
    assert ("roles/kubernetes/tasks/cluster.yml", "Initialise the cluster on the first control-plane node") in names
    assert ("roles/kubernetes/tasks/cluster.yml", "Ensure the node has joined the cluster") in names
    assert any("password" in words for _path, _name, words, _covered in FINDINGS)


@pytest.mark.parametrize(
    ("path", "name", "words", "covered"), FINDINGS, ids=[f"{path}:{name}" for path, name, _w, _c in FINDINGS]
)
def test_secret_bearing_task_has_no_log(path: str, name: str, words: list[str], covered: bool) -> None:
    if (path, name) in ALLOWED:
        assert not covered, f"{path}: '{name}' now has no_log; drop it from ALLOWED"
        return
    assert covered, (
        f"{path}: task '{name}' handles {', '.join(words)} without no_log: true. Add no_log: true "
        "(its arguments or output could print the secret), or, if it cannot, add it to ALLOWED in "
        "tests/test_no_log.py with the reason."
    )


def test_every_allowed_exception_still_exists() -> None:
    names = {(path, name) for path, name, _words, _covered in FINDINGS}
    assert set(ALLOWED) <= names, f"stale entries in ALLOWED: {set(ALLOWED) - names}"

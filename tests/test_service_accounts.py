"""Every account a role creates cannot log in: a nologin shell and no usable password.

Static half of the property (molecule/common proves it on a converged host for every account there):
each `user` task of every role that creates an account sets a nologin shell and either locks the
password or creates a system account (useradd gives those a locked "!" password). Tasks that only
change the groups of existing accounts, and the key-only admin users, are listed with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

COLLECTION = Path(__file__).resolve().parent.parent / "ansible_collections" / "quantnova" / "grandmodel"
USER_MODULES = {"user", "ansible.builtin.user"}
NOLOGIN = {"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"}
# (file, task name) -> why the task may leave a login shell.
LOGIN_ALLOWED = {
    ("roles/common/tasks/admins.yml", "Ensure each admin user exists with a locked password, or is removed"):
        "the admins from common_admin_users log in with keys only; their passwords are locked",
}


def user_tasks() -> Iterator[tuple[str, str, dict[str, Any]]]:
    def walk(items: Any) -> Iterator[dict[str, Any]]:
        for item in items or []:
            if isinstance(item, dict):
                if any(k in item for k in ("block", "rescue", "always")):
                    for key in ("block", "rescue", "always"):
                        yield from walk(item.get(key))
                else:
                    yield item

    for path in sorted((COLLECTION / "roles").glob("*/tasks/*.yml")):
        for task in walk(yaml.safe_load(path.read_text())):
            for module in USER_MODULES & set(task):
                yield str(path.relative_to(COLLECTION)), str(task.get("name")), task[module]


def creates_an_account(args: dict[str, Any]) -> bool:
    """False for tasks that only add existing accounts to groups (append) or remove accounts."""
    if str(args.get("state", "present")) == "absent":
        return False
    membership_only = args.get("append") is True and set(args) <= {"name", "groups", "append"}
    return not membership_only


USERS = list(user_tasks())


def test_the_scan_sees_the_service_accounts() -> None:
    files = {path for path, _name, _args in USERS}
    assert "roles/common/tasks/account.yml" in files
    assert "roles/exporters/tasks/exporter.yml" in files


@pytest.mark.parametrize(("path", "name", "args"), USERS, ids=[f"{p}:{n}" for p, n, _a in USERS])
def test_accounts_the_roles_create_cannot_log_in(path: str, name: str, args: dict[str, Any]) -> None:
    if not creates_an_account(args) or (path, name) in LOGIN_ALLOWED:
        return
    assert args.get("shell") in NOLOGIN, f"{path}: '{name}' creates an account with shell {args.get('shell')}"
    locked = args.get("password_lock") is True or (args.get("system") is True and "password" not in args)
    assert locked, f"{path}: '{name}' must lock the password (password_lock: true) or create a system account"

"""Offline stand-in for ansible-test's pip bootstrap script (get-pip-<version>.py).

ansible-test creates each sanity-test virtualenv without pip and downloads a bootstrap script
from ci-files.testing.ansible.com, which our CI and trading networks cannot reach. This script
takes the same arguments, seeds pip from the interpreter's bundled ensurepip and then installs
the requested pip version (and any other packages) from the configured package index.
scripts/setup.sh places it where ansible-test looks for its cached copy.
"""

import subprocess
import sys

IGNORED = {"--no-setuptools", "--no-wheel"}

args = [a for a in sys.argv[1:] if a not in IGNORED]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"],
                      stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *args])

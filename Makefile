# GrandModel Ops. Run as root on Debian 12; every target installs what it needs first.
#   make demo   sandbox hosts on local podman + site.yml on them, then where to look
#   make doctor can this machine run the sandbox and the suite (setup runs it too)
#   make test   every check: lint, sanity, pytest, molecule scenarios (summary at the end)
PY := .venv/bin/python

.PHONY: setup doctor demo test bench bench-release lint readmes ee sandbox-up sandbox-down molecule-% clean

setup:
	@bash scripts/setup.sh

doctor:
	@python3 scripts/sandbox.py doctor

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(PY) scripts/run_checks.py

ee: setup
	@$(PY) scripts/build_ee.py

readmes: setup
	@$(PY) scripts/role_readmes.py

lint: setup
	@$(PY) scripts/run_checks.py --only collections --only yamllint --only ansible-lint --only ruff --only mypy

bench: setup
	@$(PY) model_service/bench/bench.py

bench-release: setup
	@$(PY) scripts/bench_rollout.py

sandbox-up: setup
	@$(PY) scripts/sandbox.py up

sandbox-down:
	@python3 scripts/sandbox.py down

molecule-%: setup
	@$(PY) scripts/run_checks.py --only molecule:$*

clean: sandbox-down
	rm -rf reports .ansible/facts

# kvmweb — the two commands a newcomer needs are `make run` and `make test`.
PY := .venv/bin/python

.PHONY: run test setup lint format lab-up lab-down demo messages

run:            ## set up (first time) and start the site + workers on 127.0.0.1:8000
	bash scripts/setup.sh run
	bash scripts/run.sh

test:           ## set up (first time) and run every test, lab and browser tests included
	bash scripts/setup.sh test
	bash scripts/test.sh

setup:
	bash scripts/setup.sh test

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

messages:       ## refresh translation catalogs after changing UI text
	$(PY) manage.py makemessages -l zh_Hans --ignore=.venv --ignore=lab
	$(PY) manage.py compilemessages -l zh_Hans --ignore=.venv

lab-up:         ## start the KVM lab (2 simulated hosts; LAB_HOSTS=3 for three)
	bash scripts/setup.sh test
	$(PY) lab/labctl.py up --hosts $${LAB_HOSTS:-2}

lab-down:
	$(PY) lab/labctl.py down

demo:           ## `make run` plus a lab with hosts lab-a, lab-b and three demo guests
	bash scripts/setup.sh test
	bash scripts/setup.sh run
	$(PY) manage.py lab_demo --hosts $${LAB_HOSTS:-2}
	bash scripts/run.sh

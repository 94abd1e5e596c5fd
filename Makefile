# ngx_chat_module -- build, run and test.
#
#   make build         dynamic module for Debian's nginx -> build/dyn/ngx_chat_module.so
#   make static        nginx with the module compiled in -> build/static/nginx
#                      (ASAN=1 -> build/static-asan/nginx, UBSAN=1 adds UBSan)
#   make run           PostgreSQL + nginx + demo token server out of var/
#   make stop          stops them
#   make test          builds, runs t/*.t with prove, then checks the static build
#   make test-static   runs t/*.t against build/static*/nginx (ASAN=1 for ASan)
#   make test-harness  self-test of the harness (no chat module needed)
#   make clean         removes build products (keeps the nginx source cache
#                      build/src and var/); make distclean removes both
#
# Every target that builds or runs first installs missing Debian packages
# (scripts/install-deps.sh; NODEPS=1 skips that). Tests: TESTS="t/010-x.t ..."
# picks files, PROVE_FLAGS (default -v) passes flags to prove, KEEP=1 keeps
# the tests' temp dirs.

SHELL := /bin/bash
REPO := $(CURDIR)
PYTHON := /usr/bin/python3
TESTS ?= t/
PROVE_FLAGS ?= -v
ASAN ?= 0
UBSAN ?= 0
export ASAN UBSAN

ifeq ($(ASAN),1)
STATIC_BIN := build/static-asan/nginx
else ifeq ($(UBSAN),1)
STATIC_BIN := build/static-ubsan/nginx
else
STATIC_BIN := build/static/nginx
endif

.PHONY: all deps build static run stop status test test-static test-harness \
        clean distclean

all: build

deps:
ifneq ($(NODEPS),1)
	@bash scripts/install-deps.sh
endif

build: deps
	@bash scripts/build.sh dyn

static: deps
	@bash scripts/build.sh static

run: deps build
	@bash scripts/run.sh start

stop:
	@bash scripts/run.sh stop

status:
	@bash scripts/run.sh status

# prove runs each .t with perl, which hands a file whose #! line names
# another interpreter (#!/usr/bin/python3) to that interpreter.
test: deps build
	@rc=0; \
	PYTHONPATH=$(REPO)/t/lib prove --timer $(PROVE_FLAGS) $(TESTS) || rc=1; \
	echo "== static build check (nginx with the module compiled in)"; \
	bash scripts/build.sh static || { echo "static build: FAILED"; rc=1; }; \
	exit $$rc

test-static: static
	PYTHONPATH=$(REPO)/t/lib CHAT_NGINX=$(REPO)/$(STATIC_BIN) \
	    prove --timer $(PROVE_FLAGS) $(TESTS)

test-harness: deps
	$(PYTHON) t/lib/selftest.py

clean:
	rm -rf build/dyn build/static build/static-asan build/static-ubsan

distclean: stop
	rm -rf build var

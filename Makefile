# Two commands do all the set-up from a fresh clone: `make demo` and `make test`.
# `make install` is the idempotent step both use. The test extras include
# nbgrader, so CI shows that nbgrader's own generate_assignment accepts the
# exercise sources; learners and Binder do not need it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := qemu-system-x86 dpdk dpdk-dev chromium
# The local JupyterHub check's proxy, from the npm registry, into .hub/ (not global).
CHP := configurable-http-proxy@5.3.0
HUB_PROXY := .hub/node_modules/.bin/configurable-http-proxy

# Other QEMU releases, each from its Debian release, for `make test-qemu-releases`:
# bullseye 5.2 and trixie 10.0 around the installed bookworm 7.2 (Binder's
# Ubuntu QEMU, 6.2 or 8.2, lies between them).
QEMU_RELEASES := bullseye trixie

.PHONY: install system-packages demo test test-qemu-releases lab bench soak doctor clean

install: system-packages $(STAMP) $(HUB_PROXY)

# QEMU and DPDK are the real peers the tests and labs drive; Debian's chromium
# is the browser the browser test drives (playwright, no browser download).
# Install them with apt-get when we are root and they are missing; otherwise say how.
system-packages:
	@if command -v qemu-system-x86_64 >/dev/null 2>&1 && command -v dpdk-testpmd >/dev/null 2>&1 \
	    && command -v chromium >/dev/null 2>&1; then \
	    :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(APT_PACKAGES) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	else \
	    echo "QEMU, DPDK or chromium is missing; the labs fall back to the built-in front-end, the browser test skips."; \
	    echo "To install them: sudo apt-get update && sudo apt-get install -y --no-install-recommends $(APT_PACKAGES)"; \
	fi

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,nbgrader,hub]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# Needs Node.js and npm (Debian: apt-get install nodejs npm); without them the hub test skips.
$(HUB_PROXY):
	@if command -v npm >/dev/null 2>&1; then \
	    npm install --prefix .hub --no-audit --no-fund --loglevel=error $(CHP); \
	else \
	    echo "npm is missing: the JupyterHub test skips (apt-get install nodejs npm)"; \
	fi

demo: install
	$(BIN)/vhostlab demo

# pytest exits 5 when it collected nothing; that is a failure here, never a pass.
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The QEMU tests and every lab again, against each release in QEMU_RELEASES.
# scripts/debian-qemu.sh builds a minimal root per release once (as root) and
# reuses it; a release that cannot be had fails the target, it does not skip.
test-qemu-releases: install
	@set -e; for release in $(QEMU_RELEASES); do \
	    qemu=$$(scripts/debian-qemu.sh $$release | tail -n1); \
	    echo "== QEMU tests and labs against $$($$qemu --version | head -n1) (Debian $$release)"; \
	    VHOSTLAB_QEMU=$$qemu VHOSTLAB_REQUIRE_QEMU=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m qemu; \
	done

lab: install
	$(BIN)/vhostlab lab labs

bench: install
	$(BIN)/vhostlab bench

# 10^6 fuzzed messages and 200 fault cycles against a `vhostlab serve` process;
# prints one JSON line, fails on any crash, hang, unanswered request or leak.
soak: install
	nice -n 10 $(BIN)/python -m vhostlab.backend.soak

doctor: install
	$(BIN)/vhostlab doctor

clean:
	rm -rf $(VENV) build *.egg-info .hub
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

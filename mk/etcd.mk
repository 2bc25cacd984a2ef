# etcd: Debian's etcd-server, the cluster the etcd store's tests start, the
# benchmark's peer and `make demo-ha`'s engine. Included by the Makefile.
#
#   make etcd-deps   apt-get install it when etcd is missing; nothing when present.
#                    Non-interactive (CI=true, no stdin); as root, or with
#                    password-less sudo. When it cannot install, it says so
#                    in one line and carries on: the etcd tests then skip.
#   make demo-ha     a three-member etcd and two registry fronts on loopback,
#                    an agent and the reconciler on both; kills a front and
#                    the etcd leader while names keep resolving (fails at
#                    once without etcd)

ETCD_APT := etcd-server
# apt needs root; as anyone else try sudo without a password prompt.
ETCD_SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
# Where localetcd looks for the binary (geryon/localetcd.py binary()).
ETCD_FOUND = command -v etcd >/dev/null 2>&1 || test -x /usr/bin/etcd

.PHONY: etcd-deps demo-ha

# Only `make test` and `make bench` need etcd, and both get on without it
# (its tests skip, saying why): a failed install is a line, not a stop.
etcd-deps:
	@$(ETCD_FOUND) && exit 0; \
	if [ -n "$(ETCD_SUDO)" ] && ! sudo -n true 2>/dev/null; then \
	    why="not root, and no password-less sudo"; \
	else \
	    echo "etcd-deps: installing $(ETCD_APT)"; \
	    $(ETCD_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null && \
	    $(ETCD_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(ETCD_APT) </dev/null >/dev/null && exit 0; \
	    why="apt-get failed"; \
	fi; \
	echo "etcd-deps: cannot install $(ETCD_APT) ($$why); the etcd tests will skip"

demo-ha: $(STAMP) etcd-deps
	@$(ETCD_FOUND) || { echo "demo-ha: etcd is not installed (Debian's etcd-server; make etcd-deps installs it as root)" >&2; exit 1; }
	$(BIN)/python -m geryon.demo --ha

test: etcd-deps
bench: etcd-deps

# etcd: Debian's etcd-server, the cluster the etcd store's tests start, the
# benchmark's peer and `make demo-ha`'s engine. Included by the Makefile.
#
#   make etcd-deps   apt-get install it when missing; nothing when present.
#                    Non-interactive (CI=true, no stdin); needs root, or
#                    password-less sudo.
#   make demo-ha     a three-member etcd and two registry fronts on loopback,
#                    an agent and the reconciler on both; kills a front and
#                    the etcd leader while names keep resolving

ETCD_APT := etcd-server
# apt needs root; as anyone else try sudo without a password prompt.
ETCD_SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)

.PHONY: etcd-deps demo-ha

etcd-deps:
	@missing=; for p in $(ETCD_APT); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "etcd-deps: installing$$missing"; \
	    $(ETCD_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null && \
	    $(ETCD_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $$missing </dev/null >/dev/null; \
	fi

demo-ha: $(STAMP) etcd-deps
	$(BIN)/python -m geryon.demo --ha

test: etcd-deps
bench: etcd-deps

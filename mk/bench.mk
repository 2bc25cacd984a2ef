# Benchmark dependencies: Debian's etcd (the server `make bench` compares
# Geryon with) and etcd's .proto files (golang-etcd-server-dev), from which the
# benchmark generates its Python stubs at run time. Included by the Makefile.
#
#   make bench-deps   apt-get install them when missing; nothing when present.
#                     Non-interactive (CI=true, no stdin); needs root, or
#                     password-less sudo.

BENCH_APT := etcd-server golang-etcd-server-dev
# apt needs root; as anyone else try sudo without a password prompt.
BENCH_SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)

.PHONY: bench-deps

bench-deps:
	@missing=; for p in $(BENCH_APT); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "bench-deps: installing$$missing"; \
	    $(BENCH_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null && \
	    $(BENCH_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $$missing </dev/null >/dev/null; \
	fi

bench: bench-deps

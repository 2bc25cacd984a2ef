# FUSE: `geryon mount` needs the kernel's /dev/fuse, Debian's fuse3
# (fusermount3) and pyfuse3, which builds against libfuse3-dev. Included by
# the Makefile.
#
#   make fuse-deps   apt-get install fuse3, libfuse3-dev and pkg-config when
#                    missing, then pyfuse3 into the venv. Non-interactive; as
#                    root or with password-less sudo. When it cannot, it says
#                    so in one line and carries on: `geryon mount` then says
#                    FUSE is unavailable, the FUSE tests skip saying why, and
#                    `geryon disk ls|cat|put...` still work.

FUSE_APT   := fuse3 libfuse3-dev pkg-config
FUSE_SUDO  := $(if $(filter 0,$(shell id -u)),,sudo -n)
FUSE_STAMP := $(VENV)/.fuse-installed
FUSE_FOUND = command -v fusermount3 >/dev/null 2>&1 && pkg-config --exists fuse3 2>/dev/null

.PHONY: fuse-deps

fuse-deps: $(FUSE_STAMP)

$(FUSE_STAMP): $(STAMP) requirements-fuse.lock
	@if ! $(FUSE_FOUND); then \
	    if [ -n "$(FUSE_SUDO)" ] && ! sudo -n true 2>/dev/null; then \
	        echo "fuse-deps: cannot install $(FUSE_APT) (not root, and no password-less sudo); FUSE tests will skip"; exit 0; \
	    fi; \
	    echo "fuse-deps: installing $(FUSE_APT)"; \
	    $(FUSE_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null && \
	    $(FUSE_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(FUSE_APT) </dev/null >/dev/null || \
	    { echo "fuse-deps: apt-get failed; FUSE tests will skip"; exit 0; }; \
	fi; \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-fuse.lock \
	    && touch $@ || echo "fuse-deps: pyfuse3 did not install; FUSE tests will skip"

test: fuse-deps
demo: fuse-deps
bench: fuse-deps

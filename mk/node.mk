# Node.js tooling: the Node registry client (clients/node/) and the buf CLI
# (pinned as the npm package @bufbuild/buf in tools/buf/). Included by the
# Makefile.
#
#   make node-deps   npm ci in clients/node and tools/buf when their
#                    node_modules is missing or older than package*.json
#   make lint-buf    buf lint + buf breaking (tools/buf/breaking.sh)
#   make test-node   the Node scenario test against the registry named by
#                    GERYON_REGISTRY (host:port, default 127.0.0.1:6675),
#                    over TLS when GERYON_TLS_DIR is set; it does not start a
#                    registry (the Python suite starts one and runs
#                    `npm test` in clients/node itself)

NPM             ?= npm
NODE_CLIENT_DIR := clients/node
BUF_TOOL_DIR    := tools/buf
BUF             := $(BUF_TOOL_DIR)/node_modules/.bin/buf
# npm ci never prompts; these keep it quiet and off the network when its cache
# already holds the packages. Install scripts are not needed: buf's bin/buf
# finds its platform binary without them, and protobufjs's only checks
# versions.
NPM_CI          := $(NPM) ci --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=error
NODE_STAMP      := node_modules/.geryon-installed

.PHONY: node-deps lint-buf test-node

node-deps: $(NODE_CLIENT_DIR)/$(NODE_STAMP) $(BUF_TOOL_DIR)/$(NODE_STAMP)

# npm ci starts from an empty node_modules, so the stamp is written after it.
$(NODE_CLIENT_DIR)/$(NODE_STAMP) $(BUF_TOOL_DIR)/$(NODE_STAMP): %/$(NODE_STAMP): %/package.json %/package-lock.json
	cd $* && $(NPM_CI) </dev/null >/dev/null
	touch $@

lint-buf: $(BUF_TOOL_DIR)/$(NODE_STAMP)
	$(BUF) lint
	BUF=$(CURDIR)/$(BUF) $(BUF_TOOL_DIR)/breaking.sh

lint: lint-buf

test-node: $(NODE_CLIENT_DIR)/$(NODE_STAMP)
	cd $(NODE_CLIENT_DIR) && $(NPM) test --silent </dev/null

# make test runs the Node client's scenario against a real registry.
test: node-deps

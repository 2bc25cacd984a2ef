#!/usr/bin/env bash
# Checks proto/ for breaking changes (buf's FILE rules, see buf.yaml) against
# the last release tag, or against the previous commit while there is no tag.
# Skips (exit 0) when there is nothing to compare with: no previous commit
# (e.g. a fresh repo, or a shallow clone) or no .proto under proto/ there.
#
# Usage: tools/buf/breaking.sh            (from anywhere in the repo)
#        BUF=/path/to/buf tools/buf/breaking.sh
set -euo pipefail

root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
BUF=${BUF:-tools/buf/node_modules/.bin/buf}

if ref=$(git describe --tags --abbrev=0 2>/dev/null); then
    what="last release tag $ref"
else
    ref=HEAD~1
    what="previous commit (no tag yet)"
fi

if ! commit=$(git rev-parse --verify --quiet "$ref^{commit}"); then
    echo "buf breaking: skipped: no $what to compare with" >&2
    exit 0
fi
if ! git ls-tree -r --name-only "$commit" -- proto | grep -q '\.proto$'; then
    echo "buf breaking: skipped: no proto/ files at $ref (${commit:0:12})" >&2
    exit 0
fi

# buf reads the local repository itself (it clones .git); give it the full
# commit id, which it resolves without a branch or tag name.
echo "buf breaking: proto/ against $what: $ref (${commit:0:12})" >&2
exec "$BUF" breaking proto --against ".git#ref=$commit,subdir=proto"

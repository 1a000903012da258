#!/usr/bin/env bash
# Packs the Node binary that runs bench/gpu/node-checks.mjs on the GPU machine (which has no Node) into
# bench/gpu/node/node.xz (gitignored; ~24 MB, inside the device tool's 64 MiB with dist/ and the addon).
# Build first: `npm run build` (dist/ and distcp.linux-x64-gnu.node). Then, from a session with the device tool:
#   run(command="bash bench/gpu/run.sh --node", carry=["bench/gpu/bin","bench/gpu/node","dist","distcp.linux-x64-gnu.node"], timeout_s=300)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p node
node_bin="$(command -v node)"
xz -T0 -6 -c "$node_bin" > node/node.xz.tmp && mv node/node.xz.tmp node/node.xz
"$node_bin" --version > node/VERSION
echo "packed $node_bin ($(cat node/VERSION)) into $(pwd)/node/node.xz ($(du -h node/node.xz | cut -f1))"

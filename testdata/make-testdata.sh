#!/usr/bin/env bash
# Regenerate the small test images committed next to this script.
#
#   testdata/make-testdata.sh [OUTDIR]     (default: the script's own directory)
#
# Needs qemu-img and qemu-io (Debian: qemu-utils). Only fixed patterns are
# written, so the guest-visible content is the same on every run;
# tests/testdata.rs regenerates into a temp dir and checks that.
#
# Images (each well under 1 MiB on disk):
#   mixed.qcow2        4 MiB qcow2 v3, 64 KiB clusters: data (aligned and not),
#                      a zero cluster, an unmapped zero cluster, a discarded
#                      cluster and zlib-compressed clusters
#   chain/base.qcow2   4 MiB qcow2, 4 KiB clusters, zstd-compressed and data clusters
#   chain/top.qcow2    overlay of chain/base.qcow2 by the relative name
#                      "base.qcow2": its own data, a zero cluster hiding base
#                      data, and a discard
#   small.raw          5000-byte raw image (size not a multiple of 512)
set -euo pipefail

out=${1:-$(cd "$(dirname "$0")" && pwd)}
mkdir -p "$out/chain"
cd "$out"
rm -f mixed.qcow2 chain/base.qcow2 chain/top.qcow2 small.raw

io() { # io IMAGE CMD...
    local img=$1
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}

qemu-img create -q -f qcow2 mixed.qcow2 4M
io mixed.qcow2 \
    'write -P 0x11 0 64k' \
    'write -P 0x12 100k 3000' \
    'write -z 192k 64k' \
    'write -P 0x13 256k 64k' \
    'write -z -u 256k 64k' \
    'write -c -P 0x14 512k 128k' \
    'write -P 0x15 1M 64k' \
    'discard 1M 64k' \
    'write -c -P 0x16 4128768 64k'

qemu-img create -q -f qcow2 -o cluster_size=4096,compression_type=zstd chain/base.qcow2 4M
io chain/base.qcow2 \
    'write -P 0x21 0 256k' \
    'write -c -P 0x22 1M 64k' \
    'write -P 0x23 3M 8k'
# Created from inside chain/ so that the stored backing name is relative.
(cd chain && qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 top.qcow2)
io chain/top.qcow2 \
    'write -P 0x31 8k 4k' \
    'write -z 64k 4k' \
    'discard 1M 4k' \
    'write -P 0x32 2M 12k'

# 5000 bytes: 4096 of pattern, then 904 of another.
{
    head -c 4096 /dev/zero | tr '\0' '\101'
    head -c 904 /dev/zero | tr '\0' '\102'
} >small.raw

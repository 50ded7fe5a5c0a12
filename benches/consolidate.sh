#!/usr/bin/env bash
# Benchmark consolidation in a backup set: a full + 7 incrementals of the
# realistic 3 GiB image (benches/input.sh), pruned to the newest backup,
# so the full and 6 incrementals are merged into one consolidated parent
# (`qbackup prune --keep-last 1`), against what a user would do by hand:
#   - qemu-img convert -c -O qcow2 of the chain's 7th image (a new full);
#   - qemu-img commit of each overlay into the one below, oldest first.
# Each incremental rewrites ~2 % of the allocated data (64 KiB pieces of
# the disk's own content, scattered). Reports wall time, peak RSS and the
# output size; the set is rebuilt (copied) before each run.
# Target (issue 21): prune <= 0.3x convert -c's time, RSS <= 64 MiB.
# Usage: benches/consolidate.sh [WORKDIR]   (RUNS, default 3)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/qbackup-bench.XXXXXX)}
runs=${RUNS:-3}
mkdir -p "$work"
cd "$here"
cargo build --release --quiet
qb="$here/target/release/qbackup"

# shellcheck source=benches/input.sh
. "$here/benches/input.sh"
cd "$work"
bench_disk
[ -f disk.raw ] || qemu-img convert -O raw disk.qcow2 disk.raw

# The set: a full, then 7 incrementals by content, each after scattered
# rewrites of the source.
if [ ! -d set.orig ]; then
    rm -rf set.orig src.qcow2
    cp disk.qcow2 src.qcow2
    "$qb" backup -q src.qcow2 set.orig/
    alloc=$(qemu-img map --output=json src.qcow2 | python3 -c '
import json,sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
    for day in 1 2 3 4 5 6 7; do
        n=$((alloc / 50 / 65536))
        cmds=()
        for i in $(seq 0 $((n - 1))); do
            off=$(( ((i * 2654435761 + day * 7919) % (3072 * 16)) * 65536 ))
            cmds+=(-c "write -P $(( (i + day) % 250 + 1 )) $off 64k")
        done
        qemu-io -f qcow2 "${cmds[@]}" src.qcow2 >/dev/null
        sleep 1
        "$qb" backup -q src.qcow2 set.orig/
    done
fi
mapfile -t chain < <(ls set.orig/src/*.qcow2)

measure() {
    local walls=() rss=0 wall kib
    for _ in $(seq "$runs"); do
        "$PREP"
        /usr/bin/time -f '%e %M' -o time.txt "$@" >/dev/null 2>time.err || { cat time.err >&2; exit 1; }
        read -r wall kib < time.txt
        walls+=("$wall")
        [ "$kib" -gt "$rss" ] && rss=$kib
    done
    WALL=$(printf '%s\n' "${walls[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
    RSS=$rss
}

prep_set() { rm -rf set; cp -a set.orig set; }
prep_chain() { rm -rf chain; mkdir chain; cp set.orig/src/*.qcow2 chain/; }

PREP=prep_set
measure "$qb" prune set --keep-last 1
p_s=$WALL p_rss=$RSS
p_bytes=$(stat -c %s "$(ls set/src/*.qcow2 | head -1)")

PREP=prep_chain
seventh="chain/$(basename "${chain[6]}")"
measure qemu-img convert -c -O qcow2 "$seventh" out.qcow2
c_s=$WALL c_rss=$RSS c_bytes=$(stat -c %s out.qcow2)

commit_all() {
    local f
    for f in $(ls chain/*.qcow2 | sed -n '2,7p'); do
        qemu-img commit -q "$f"
    done
}
PREP=prep_chain
measure bash -c "$(declare -f commit_all); commit_all"
m_s=$WALL m_rss=$RSS m_bytes=$(stat -c %s "$(ls chain/*.qcow2 | head -1)")

printf '%-44s %8s %12s %8s\n' case wall_s bytes rss_MiB
printf '%-44s %8.2f %12d %8.1f\n' "qbackup prune --keep-last 1 (consolidate 7)" "$p_s" "$p_bytes" "$(awk "BEGIN{print $p_rss/1024}")"
printf '%-44s %8.2f %12d %8.1f\n' "qemu-img convert -c of the 7th image" "$c_s" "$c_bytes" "$(awk "BEGIN{print $c_rss/1024}")"
printf '%-44s %8.2f %12d %8.1f\n' "qemu-img commit of 6 overlays" "$m_s" "$m_bytes" "$(awk "BEGIN{print $m_rss/1024}")"
awk "BEGIN{printf \"prune/convert -c: time %.2f×, size %.3f×\n\", $p_s/$c_s, $p_bytes/$c_bytes}"

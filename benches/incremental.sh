#!/usr/bin/env bash
# Benchmark incremental backups (from a qcow2 persistent dirty bitmap, and
# by content from the previous backup's manifest), the manifest's cost, and
# verify.
#
# Input (DEVELOPERS.md): the realistic ext4 image of benches/compare.sh
# (built here when WORKDIR lacks it). A copy gets a bitmap and a full
# backup; then ~2 % of its allocated clusters are rewritten (64 KiB pieces
# of the disk's own content, scattered), and the same writes go to an
# overlay on the full backup. Side by side in one run:
#   - qbackup full backup (zstd), for reference;
#   - qbackup --sync incremental --bitmap (zstd, --bitmap-mode never so
#     runs repeat; one last run clears the bitmap);
#   - qemu-img convert -m 16 -W -c -B FULL of the overlay (zstd): the same
#     delta made the qemu-img way;
#   - qbackup --sync incremental without a bitmap (by content);
#   - the manifest's cost: the full backup with --no-manifest;
#   - qbackup verify of the full backup, and qemu-img compare of the full
#     backup with its source.
# Reports median wall time of RUNS (default 3), output size, peak RSS.
# Usage: benches/incremental.sh [WORKDIR]
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

rm -f src.qcow2 full.qcow2* bare.qcow2* ov.qcow2 inc.qcow2* hinc.qcow2* out.q chunk-*.bin
cp disk.qcow2 src.qcow2
qemu-img bitmap --add src.qcow2 bm0

# median NAME CMD... : median wall seconds and max peak RSS KiB of RUNS runs
median() {
    local walls=() rss=0
    for _ in $(seq "$runs"); do
        /usr/bin/time -f '%e %M' -o time.txt "$@" >/dev/null 2>time.err || { cat time.err >&2; exit 1; }
        read -r wall kib < time.txt
        walls+=("$wall")
        [ "$kib" -gt "$rss" ] && rss=$kib
    done
    WALL=$(printf '%s\n' "${walls[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
    RSS=$rss
}

median sh -c "rm -f bare.qcow2 && '$qb' backup --no-manifest disk.qcow2 bare.qcow2"
bare_s=$WALL
median sh -c "rm -f full.qcow2 && '$qb' backup disk.qcow2 full.qcow2"
full_s=$WALL full_rss=$RSS full_bytes=$(stat -c %s full.qcow2)
median "$qb" verify full.qcow2
verify_s=$WALL verify_rss=$RSS
median qemu-img compare -q disk.qcow2 full.qcow2
cmp_s=$WALL
# The cycle's start: a full backup with --bitmap clears bm0.
rm -f full.qcow2
"$qb" backup --bitmap bm0 src.qcow2 full.qcow2

# ~2 % of the allocated clusters, rewritten in 64 KiB pieces.
alloc=$(qemu-img map --output=json disk.qcow2 | python3 -c '
import json,sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
piece=$((64 << 10))
n=$((alloc / 50 / piece))
qemu-img create -q -f qcow2 -b full.qcow2 -F qcow2 ov.qcow2
cmds=()
for i in $(seq 0 $((n - 1))); do
    off=$(( (i * 2654435761 % (3072 * 16)) * piece ))
    src=$(( (i * 40503 + 17) % (600 * 16) ))
    dd if=disk.raw of=chunk-$i.bin bs=$piece skip=$src count=1 status=none
    cmds+=(-c "write -s chunk-$i.bin $off $piece")
done
qemu-io -f qcow2 "${cmds[@]}" src.qcow2 >/dev/null
qemu-io -f qcow2 "${cmds[@]}" ov.qcow2 >/dev/null
rm -f chunk-*.bin

median sh -c "rm -f out.q && qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd -B full.qcow2 -F qcow2 ov.qcow2 out.q"
q_s=$WALL q_rss=$RSS q_bytes=$(stat -c %s out.q)
median sh -c "rm -f inc.qcow2 && '$qb' backup --sync incremental --bitmap bm0 --bitmap-mode never --backing full.qcow2 src.qcow2 inc.qcow2"
i_s=$WALL i_rss=$RSS i_bytes=$(stat -c %s inc.qcow2)
qemu-img compare -q src.qcow2 inc.qcow2 || { echo "incremental differs from the source!" >&2; exit 1; }
median sh -c "rm -f hinc.qcow2 && '$qb' backup --sync incremental --backing full.qcow2 src.qcow2 hinc.qcow2"
h_s=$WALL h_rss=$RSS h_bytes=$(stat -c %s hinc.qcow2)
qemu-img compare -q src.qcow2 hinc.qcow2 || { echo "incremental by content differs!" >&2; exit 1; }
qemu-img compare -q out.q inc.qcow2 || { echo "outputs differ!" >&2; exit 1; }
# Once more, clearing the bitmap (the everyday mode).
rm -f inc.qcow2
/usr/bin/time -f '%e %M' -o time.txt "$qb" backup --sync incremental --bitmap bm0 --backing full.qcow2 src.qcow2 inc.qcow2
read -r clear_s _ < time.txt
qemu-img check -q src.qcow2

echo "rewritten: $n pieces of 64 KiB ($((n * piece >> 20)) MiB of $((alloc >> 20)) MiB allocated)"
printf '%-40s %8s %12s %8s\n' case wall_s bytes rss_MiB
printf '%-40s %8.2f %12d %8.1f\n' "qbackup full (zstd)" "$full_s" "$full_bytes" "$(awk "BEGIN{print $full_rss/1024}")"
printf '%-40s %8.2f %12d %8.1f\n' "qemu-img convert -c -B full (overlay)" "$q_s" "$q_bytes" "$(awk "BEGIN{print $q_rss/1024}")"
printf '%-40s %8.2f %12d %8.1f\n' "qbackup incremental (bitmap)" "$i_s" "$i_bytes" "$(awk "BEGIN{print $i_rss/1024}")"
printf '%-40s %8.2f\n' "qbackup incremental + clearing bm0" "$clear_s"
printf '%-40s %8.2f %12d %8.1f\n' "qbackup incremental by content" "$h_s" "$h_bytes" "$(awk "BEGIN{print $h_rss/1024}")"
printf '%-40s %8.2f\n' "qbackup full, --no-manifest" "$bare_s"
printf '%-40s %8.2f %12s %8.1f\n' "qbackup verify full" "$verify_s" - "$(awk "BEGIN{print $verify_rss/1024}")"
printf '%-40s %8.2f\n' "qemu-img compare source full" "$cmp_s"
awk "BEGIN{printf \"manifest overhead %.3f×; verify/backup %.2f×, verify/qemu-img compare %.2f×; by-content/full: time %.3f×, size %.3f×\n\", $full_s/$bare_s, $verify_s/$full_s, $verify_s/$cmp_s, $h_s/$full_s, $h_bytes/$full_bytes}"
awk "BEGIN{printf \"incremental/full: time %.3f×, size %.3f×; incremental/qemu-img: time %.2f×, size %.3f×\n\", $i_s/$full_s, $i_bytes/$full_bytes, $i_s/$q_s, $i_bytes/$q_bytes}"

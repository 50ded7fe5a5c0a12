#!/usr/bin/env bash
# Benchmark qbackup against `qemu-img convert -m 16 -W` in the same run.
#
# Input (DEVELOPERS.md): an ext4 filesystem filled from /usr/lib/x86_64-linux-gnu,
# 3 GiB raw, converted to qcow2. Reports wall time, CPU time (user + system),
# output size and peak RSS for each case and the ratios qbackup/qemu-img;
# then the codec limit (examples/codec_limit.rs: the same non-zero clusters
# compressed in memory by the same codec, level and threads, no I/O) and
# qbackup/limit; a threads scaling row; and a huge sparse image (2 TiB raw,
# 4 KiB written every 512 MiB: 4096 L2 tables in the target) for memory.
# Usage:
#   benches/compare.sh [WORKDIR]      (default: a fresh directory under /tmp)
# Set RUNS=N to repeat each measurement (the median wall and CPU time of the
# runs are reported, and the largest peak RSS).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/qbackup-bench.XXXXXX)}
runs=${RUNS:-1}
mkdir -p "$work"
cd "$here"
cargo build --release --quiet --bin qbackup --example codec_limit
qb="$here/target/release/qbackup"
limit="$here/target/release/examples/codec_limit"
threads=$(nproc)

# shellcheck source=benches/input.sh
. "$here/benches/input.sh"
cd "$work"
bench_disk
bench_top

# measure CMD... : median wall and CPU seconds, peak RSS KiB, into globals
measure() {
    local rss=0 walls=() cpus=()
    for _ in $(seq "$runs"); do
        rm -f out.tmp
        /usr/bin/time -f '%e %M %U %S' -o time.txt "$@" >/dev/null 2>time.err || { cat time.err >&2; exit 1; }
        read -r wall kib user sys < time.txt
        walls+=("$wall"); cpus+=("$(awk "BEGIN{print $user + $sys}")")
        [ "$kib" -gt "$rss" ] && rss=$kib
    done
    WALL=$(median "${walls[@]}"); CPU=$(median "${cpus[@]}"); RSS=$rss
}
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

printf '%-22s %8s %8s %8s %8s %7s %12s %12s %7s %8s %8s\n' case qemu_s qemu_cpu qb_s qb_cpu time× qemu_bytes qb_bytes size× qemu_MiB qb_MiB
row() { # name qemu-cmd... -- qb-cmd...
    local name=$1; shift
    local qcmd=() qbcmd=()
    while [ "$1" != "--" ]; do qcmd+=("$1"); shift; done; shift
    qbcmd=("$@")
    measure "${qcmd[@]}"; local qw=$WALL qc=$CPU qr=$RSS qs; qs=$(stat -c %s out.q)
    measure "${qbcmd[@]}"; local bw=$WALL bc=$CPU br=$RSS bs; bs=$(stat -c %s out.b)
    QB_WALL=$bw; QB_CPU=$bc; QB_BYTES=$bs
    qemu-img compare -q out.q out.b || { echo "$name: outputs differ!" >&2; exit 1; }
    printf '%-22s %8.2f %8.2f %8.2f %8.2f %7.2f %12d %12d %7.3f %8.1f %8.1f\n' "$name" "$qw" "$qc" "$bw" "$bc" \
        "$(awk "BEGIN{print $bw/$qw}")" "$qs" "$bs" "$(awk "BEGIN{print $bs/$qs}")" \
        "$(awk "BEGIN{print $qr/1024}")" "$(awk "BEGIN{print $br/1024}")"
    rm -f out.q out.b
}

# limit_row NAME CODEC LEVEL THREADS: the codec limit next to the qbackup run
# just measured (QB_WALL, QB_CPU, QB_BYTES).
limit_row() {
    local name=$1 codec=$2 level=$3 t=$4 walls=() cpus=() bytes
    for _ in $(seq "$runs"); do
        read -r w c bytes _ < <("$limit" disk.raw "$codec" "$level" "$t")
        walls+=("$w"); cpus+=("$c")
    done
    local lw lc; lw=$(median "${walls[@]}"); lc=$(median "${cpus[@]}")
    printf '%-22s limit %6.2f s, %6.2f CPU-s, %12d bytes | qbackup/limit: time %5.2f×, CPU %5.2f×, size %6.3f×\n' \
        "$name" "$lw" "$lc" "$bytes" "$(awk "BEGIN{print $QB_WALL/$lw}")" \
        "$(awk "BEGIN{print $QB_CPU/$lc}")" "$(awk "BEGIN{print $QB_BYTES/$bytes}")"
}

row "full zstd" qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd disk.qcow2 out.q -- \
    "$qb" backup --threads "$threads" --compress zstd --force disk.qcow2 out.b
zstd_wall=$QB_WALL zstd_cpu=$QB_CPU zstd_bytes=$QB_BYTES
row "full zlib" qemu-img convert -m 16 -W -c -O qcow2 disk.qcow2 out.q -- \
    "$qb" backup --threads "$threads" --compress zlib --force disk.qcow2 out.b
limit_row "limit zlib 6 -T$threads" zlib 6 "$threads"
QB_WALL=$zstd_wall QB_CPU=$zstd_cpu QB_BYTES=$zstd_bytes
limit_row "limit zstd 3 -T$threads" zstd 3 "$threads"
# The manifest's share: the same backup without it (no CRC32/BLAKE3 per
# cluster, no sidecar file).
row "full zstd no manifest" qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd disk.qcow2 out.q -- \
    "$qb" backup --threads "$threads" --compress zstd --no-manifest --force disk.qcow2 out.b
limit_row "limit zstd 3 -T$threads" zstd 3 "$threads"
row "full uncompressed" qemu-img convert -m 16 -W -O qcow2 disk.qcow2 out.q -- \
    "$qb" backup --threads "$threads" --compress none --force disk.qcow2 out.b
# qemu-img does not sync its output; qbackup must (it renames a synced file
# into place). The same copy with qemu-img followed by an fsync of its output:
row "full uncompr.+fsync" sh -c 'qemu-img convert -m 16 -W -O qcow2 disk.qcow2 out.q && sync out.q' -- \
    "$qb" backup --threads "$threads" --compress none --force disk.qcow2 out.b
row "top zstd (10%)" qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd -B disk.qcow2 -F qcow2 top.qcow2 out.q -- \
    "$qb" backup --sync top --threads "$threads" --compress zstd --force top.qcow2 out.b

# Scaling: qbackup zstd and the codec limit on 1, 2 and all threads, and
# how busy the cores are kept: wall time over (CPU time with one thread /
# threads), the issue-12 measure (target <= 1.15).
cpu1=
for t in $(printf '%s\n' 1 2 "$threads" | sort -un); do
    measure "$qb" backup --threads "$t" --compress zstd --force disk.qcow2 out.b
    QB_WALL=$WALL QB_CPU=$CPU QB_BYTES=$(stat -c %s out.b)
    [ -z "$cpu1" ] && cpu1=$CPU
    printf 'threads %-3s qbackup zstd %6.2f s, %6.2f CPU-s, %5.1f MiB, busy ratio %5.2f; ' "$t" "$WALL" "$CPU" \
        "$(awk "BEGIN{print $RSS/1024}")" "$(awk "BEGIN{print $WALL / ($cpu1 / $t)}")"
    limit_row "" zstd 3 "$t"
    rm -f out.b
done

# Memory on a huge sparse image: 2 TiB raw, 4 KiB written every 512 MiB,
# so that the target has 4096 L2 tables.
if [ ! -f sparse.raw ]; then
    truncate -s 2T sparse.raw
    python3 - <<'PY'
import os
fd = os.open("sparse.raw", os.O_WRONLY)
for i in range((2 << 40) // (512 << 20)):
    os.pwrite(fd, (b"sparse %d " % i) * 400 + bytes(96), i * (512 << 20))
os.close(fd)
PY
fi
row "sparse 2 TiB zstd" qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd -f raw sparse.raw out.q -- \
    "$qb" backup --threads "$threads" --compress zstd --force sparse.raw out.b

# Live backups: the same disk served by qemu-nbd (read-only, multi-conn),
# qemu-img and qbackup both reading the export.
rm -f nbd.sock
qemu-nbd -r -t -e 8 -f qcow2 -k "$work/nbd.sock" disk.qcow2 &
nbd_pid=$!
trap 'kill $nbd_pid 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S nbd.sock ] && break; sleep 0.05; done
uri="nbd+unix:///?socket=$work/nbd.sock"
row "nbd zstd" qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd "$uri" out.q -- \
    "$qb" backup --threads "$threads" --compress zstd --force "$uri" out.b
row "nbd uncompressed" qemu-img convert -m 16 -W -O qcow2 "$uri" out.q -- \
    "$qb" backup --threads "$threads" --compress none --force "$uri" out.b
measure nbdcopy "$uri" out.q
printf 'nbdcopy of the export to a raw file: %.2f s\n' "$WALL"
rm -f out.q
kill $nbd_pid; wait $nbd_pid 2>/dev/null || true
trap - EXIT

# The practical limit: zstd -3 on all cores over the same allocated bytes.
python3 - > alloc.bin <<'PY'
import json, subprocess, sys
m = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", "-f", "raw", "disk.raw"]))
with open("disk.raw", "rb") as f:
    for e in m:
        if e["data"]:
            f.seek(e["start"]); left = e["length"]
            while left:
                b = f.read(min(left, 1 << 22)); sys.stdout.buffer.write(b); left -= len(b)
PY
/usr/bin/time -f '%e %M' -o time.txt zstd -q -3 -T"$threads" -f alloc.bin -o alloc.zst
read -r zw _ < time.txt
printf 'zstd -3 -T%s over %d allocated bytes: %.2f s, %d bytes\n' "$threads" "$(stat -c %s alloc.bin)" "$zw" "$(stat -c %s alloc.zst)"
rm -f alloc.bin alloc.zst time.txt time.err

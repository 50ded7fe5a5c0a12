#!/usr/bin/env bash
# Issue 23's rows, side by side in one run, interleaved: page cache added,
# cold and warm cache, zstd / zlib / none against `qemu-img convert -T none`,
# the codec limit, and backups from an NBD export.
#
# Input: benches/input.sh (the realistic 3 GiB ext4 image as qcow2).
# Each round runs every case once, in the same order, so a noisy shared
# machine hits all cases alike; the tables give medians with min-max.
#
# - cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before the run (needs
#   root; it empties the whole machine's page cache, so run it on a machine
#   you own), both tools.
# - warm: the source read into the page cache (`cat`) before the run.
# - cache added: MiB of the source and the outputs resident after the run
#   (fincore) minus before it. With `--cache drop` (qbackup's default) a
#   warm source stays cached (it was cached before) and nothing is added.
# - limit: examples/codec_limit.rs on the raw disk, same codec, level and
#   threads, in memory (the ratios qbackup / limit use the warm run).
# - nbd: the image served by `qemu-nbd -r -t -e 8` (multi-conn); qemu-img
#   convert -c, nbdcopy to a raw file, qbackup zstd, caches dropped before
#   each (the server reads through the page cache).
#
# Usage: benches/cache.sh [WORKDIR]   (ROUNDS=N, default 5; CASES="..." to
# run a subset, see `cases` below)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/qbackup-bench.XXXXXX)}
rounds=${ROUNDS:-5}
mkdir -p "$work"
cd "$here"
cargo build --release --quiet --bin qbackup --example codec_limit
qb="$here/target/release/qbackup"
limit="$here/target/release/examples/codec_limit"
threads=$(nproc)
[ "$(id -u)" = 0 ] || { echo "cold-cache rows need root (drop_caches)" >&2; exit 1; }

# shellcheck source=benches/input.sh
. "$here/benches/input.sh"
cd "$work"
bench_disk
set -f  # command lines below hold a URI with "?"

drop_all() { sync; echo 3 > /proc/sys/vm/drop_caches; }
resident() { # bytes of FILES... in the page cache (missing files: 0)
    local f total=0 n
    for f in "$@"; do
        [ -e "$f" ] || continue
        n=$(fincore -b -n -o RES "$f")
        total=$((total + n))
    done
    echo "$total"
}

# case NAME: "prep|command" (prep: cold, warm or none).
case_of() {
    local zq="-c -O qcow2 -o compression_type=zstd" src=disk.qcow2
    case "$1" in
        cold-zstd-qemu) echo "cold|qemu-img convert -T none -m 16 -W $zq $src out.q" ;;
        cold-zstd-qb) echo "cold|$qb backup -q --force $src out.b" ;;
        cold-zstd-qb-keep) echo "cold|$qb backup -q --force --cache keep $src out.b" ;;
        cold-zlib-qemu) echo "cold|qemu-img convert -T none -m 16 -W -c -O qcow2 $src out.q" ;;
        cold-zlib-qb) echo "cold|$qb backup -q --force --compress zlib $src out.b" ;;
        cold-none-qemu) echo "cold|qemu-img convert -T none -m 16 -W -O qcow2 $src out.q" ;;
        cold-none-qb) echo "cold|$qb backup -q --force --compress none $src out.b" ;;
        warm-zstd-qemu) echo "warm|qemu-img convert -m 16 -W $zq $src out.q" ;;
        warm-zstd-qb) echo "warm|$qb backup -q --force $src out.b" ;;
        warm-zstd-qb-keep) echo "warm|$qb backup -q --force --cache keep $src out.b" ;;
        warm-zlib-qemu) echo "warm|qemu-img convert -m 16 -W -c -O qcow2 $src out.q" ;;
        warm-zlib-qb) echo "warm|$qb backup -q --force --compress zlib $src out.b" ;;
        warm-none-qemu) echo "warm|qemu-img convert -m 16 -W -O qcow2 $src out.q" ;;
        warm-none-qb) echo "warm|$qb backup -q --force --compress none $src out.b" ;;
        limit-zstd) echo "none|$limit disk.raw zstd 3 $threads" ;;
        limit-zlib) echo "none|$limit disk.raw zlib 6 $threads" ;;
        nbd-zstd-qemu) echo "cold|qemu-img convert -m 16 -W $zq $uri out.q" ;;
        nbd-nbdcopy) echo "cold|nbdcopy $uri out.q" ;;
        nbd-zstd-qb) echo "cold|$qb backup -q --force $uri out.b" ;;
    esac
}
default_cases="cold-zstd-qemu cold-zstd-qb cold-zstd-qb-keep cold-zlib-qemu cold-zlib-qb
  cold-none-qemu cold-none-qb warm-zstd-qemu warm-zstd-qb warm-zstd-qb-keep warm-zlib-qemu
  warm-zlib-qb warm-none-qemu warm-none-qb limit-zstd limit-zlib nbd-zstd-qemu nbd-nbdcopy
  nbd-zstd-qb"
read -r -a cases <<<"$(echo ${CASES:-$default_cases})"

uri="nbd+unix:///?socket=$work/nbd.sock"
nbd_pid=
if printf '%s\n' "${cases[@]}" | grep -q '^nbd-'; then
    rm -f nbd.sock
    qemu-nbd -r -t -e 8 -f qcow2 -k "$work/nbd.sock" disk.qcow2 &
    nbd_pid=$!
    trap 'kill $nbd_pid 2>/dev/null' EXIT
    for _ in $(seq 100); do [ -S nbd.sock ] && break; sleep 0.05; done
fi

declare -A wall cpu rss added
echo "$(date -u '+%F %T') UTC, $rounds rounds, load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq "$rounds"); do
    for c in "${cases[@]}"; do
        IFS='|' read -r prep cmd <<<"$(case_of "$c")"
        rm -f out.q out.b out.b.manifest
        case $prep in
            cold) drop_all ;;
            warm) cat disk.qcow2 >/dev/null ;;
        esac
        before=$(resident disk.qcow2)
        if [ "${c#limit-}" != "$c" ]; then
            # The limit measures itself (compression only, clusters loaded).
            read -r w cp _ < <($cmd)
            kib=0
        else
            # shellcheck disable=SC2086
            /usr/bin/time -f '%e %M %U %S' -o t.txt $cmd >/dev/null 2>t.err ||
                { cat t.err >&2; exit 1; }
            read -r w kib u s < t.txt
            cp=$(awk "BEGIN{print $u + $s}")
        fi
        after=$(resident disk.qcow2 out.q out.b out.b.manifest)
        wall[$c]+="$w "; cpu[$c]+="$cp "; rss[$c]+="$kib "
        added[$c]+="$(awk "BEGIN{print ($after - $before) / 1048576}") "
    done
    echo "round $r done, load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
rm -f out.q out.b out.b.manifest t.txt t.err
[ -n "$nbd_pid" ] && { kill "$nbd_pid"; wait "$nbd_pid" 2>/dev/null || true; trap - EXIT; }

# stats "V1 V2 ...": median min max
stats() {
    tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f %.2f %.2f\n", m, v[1], v[NR] }'
}
med() { stats "$1" | cut -d' ' -f1; }

printf '| case | wall s median (min-max) | CPU s | cache added MiB (max) | peak RSS MiB |\n'
printf '| --- | --- | --- | --- | --- |\n'
for c in "${cases[@]}"; do
    read -r wm wmin wmax < <(stats "${wall[$c]}")
    read -r _ _ amax < <(stats "${added[$c]}")
    read -r _ _ rmax < <(stats "${rss[$c]}")
    printf '| %s | %s (%s-%s) | %s | %s | %.1f |\n' "$c" "$wm" "$wmin" "$wmax" "$(med "${cpu[$c]}")" \
        "$amax" "$(awk "BEGIN{print $rmax / 1024}")"
done

# ratio A B: median wall of A over B's, and CPU.
ratio() {
    [ -n "${wall[$1]:-}" ] && [ -n "${wall[$2]:-}" ] || return 0
    printf '| %s / %s | %.2f× | %.2f× |\n' "$1" "$2" \
        "$(awk "BEGIN{print $(med "${wall[$1]}") / $(med "${wall[$2]}")}")" \
        "$(awk "BEGIN{print $(med "${cpu[$1]}") / $(med "${cpu[$2]}")}")"
}
printf '\n| ratio (medians) | wall | CPU |\n| --- | --- | --- |\n'
ratio cold-zstd-qb cold-zstd-qemu
ratio cold-zstd-qb cold-zstd-qb-keep
ratio cold-zlib-qb cold-zlib-qemu
ratio cold-none-qb cold-none-qemu
ratio warm-zstd-qb warm-zstd-qemu
ratio warm-zstd-qb warm-zstd-qb-keep
ratio warm-zlib-qb warm-zlib-qemu
ratio warm-none-qb warm-none-qemu
ratio warm-zstd-qb limit-zstd
ratio warm-zlib-qb limit-zlib
ratio nbd-zstd-qb nbd-zstd-qemu
ratio nbd-zstd-qb nbd-nbdcopy

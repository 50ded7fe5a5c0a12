#!/usr/bin/env bash
# A/B of two qbackup binaries on the realistic image, interleaved: each
# round runs every case with A, then with B (the order alternating per
# round), so a noisy shared machine affects both alike. Prints the median
# wall time of each case and binary, with min-max, and B/A.
#
# Input: benches/input.sh (the realistic ext4 image and its 10 % overlay
# for --sync top, built when WORKDIR lacks them), and qemu-img convert -c
# (zstd) as the reference row.
# Usage: benches/ab.sh A_BINARY B_BINARY [WORKDIR]   (ROUNDS=N, default 5)
set -euo pipefail

a=$(realpath "$1") b=$(realpath "$2")
here=$(cd "$(dirname "$0")/.." && pwd)
work=${3:-$(mktemp -d /tmp/qbackup-bench.XXXXXX)}
rounds=${ROUNDS:-5}
mkdir -p "$work"
# shellcheck source=benches/input.sh
. "$here/benches/input.sh"
cd "$work"
bench_disk
bench_top

# case NAME BIN: the command line of case NAME run with BIN.
case_cmd() {
    case "$1" in
        full-zstd) echo "$2 backup -q --force disk.qcow2 out.qcow2" ;;
        full-none) echo "$2 backup -q --force --compress none disk.qcow2 out.qcow2" ;;
        top-zstd) echo "$2 backup -q --force --sync top top.qcow2 out.qcow2" ;;
        raw-restore) echo "$2 backup -q --force -O raw disk.qcow2 out.raw" ;;
    esac
}
cases=(full-zstd full-none top-zstd raw-restore)

# time_of CMD...: wall seconds.
time_of() {
    /usr/bin/time -f '%e' -o t.txt "$@" >/dev/null 2>t.err || { cat t.err >&2; exit 1; }
    cat t.txt
}

declare -A times
for r in $(seq "$rounds"); do
    for c in "${cases[@]}"; do
        order=(A B)
        [ $((r % 2)) -eq 0 ] && order=(B A)
        for which in "${order[@]}"; do
            bin=$a
            [ "$which" = B ] && bin=$b
            # shellcheck disable=SC2046
            t=$(time_of $(case_cmd "$c" "$bin"))
            times[$c.$which]+="$t "
        done
    done
    t=$(time_of qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd disk.qcow2 out.q)
    times[qemu.A]+="$t "
done
rm -f out.qcow2 out.raw out.q out.qcow2.manifest out.raw.manifest t.txt t.err

# stats "T1 T2 ...": median min max
stats() {
    tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f %.2f %.2f\n", m, v[1], v[NR] }'
}
printf '| case | A median (min-max) s | B median (min-max) s | B/A |\n| --- | --- | --- | --- |\n'
for c in "${cases[@]}"; do
    read -r am amin amax < <(stats "${times[$c.A]}")
    read -r bm bmin bmax < <(stats "${times[$c.B]}")
    printf '| %s | %s (%s-%s) | %s (%s-%s) | %.3f |\n' "$c" "$am" "$amin" "$amax" "$bm" "$bmin" "$bmax" \
        "$(awk "BEGIN{print $bm / $am}")"
done
read -r qm qmin qmax < <(stats "${times[qemu.A]}")
printf '| qemu-img convert -c zstd | %s (%s-%s) | | |\n' "$qm" "$qmin" "$qmax"

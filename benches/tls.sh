#!/usr/bin/env bash
# Benchmark backups pulled over NBD with TLS (issue 22): a zstd backup of
# the realistic 3 GiB image (benches/input.sh) from a qemu-nbd TLS export
# on 127.0.0.1, against the same export without TLS and against
# `qemu-img convert -c` from the TLS export (--image-opts with tls-creds).
# Targets: TLS <= 1.1x our plaintext time, and <= 0.6x qemu-img's.
# Both exports are TCP (what TLS is for), read-only, multi-conn (-e 8);
# certificates are made with openssl in the work directory.
# Usage:
#   benches/tls.sh [WORKDIR]        (default: a fresh directory under /tmp)
# RUNS=N repeats each measurement (medians reported). INPUT=IMAGE.qcow2
# uses that image instead of building the 3 GiB input (a quick smoke run).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/qbackup-bench.XXXXXX)}
runs=${RUNS:-1}
mkdir -p "$work"
cd "$here"
cargo build --release --quiet --bin qbackup
qb="$here/target/release/qbackup"

# shellcheck source=benches/input.sh
. "$here/benches/input.sh"
cd "$work"
if [ -n "${INPUT:-}" ]; then
    cp --reflink=auto "$INPUT" disk.qcow2
else
    bench_disk
fi

# CA, server (localhost, 127.0.0.1) and client directories, QEMU's layout.
make_certs() {
    [ -f pki/server/server-cert.pem ] && return 0
    mkdir -p pki/server pki/client && cd pki
    printf '[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n' >ca.cnf
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem \
        -out ca-cert.pem -days 30 -subj /CN=bench-ca -config ca.cnf -extensions v3_ca 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server/server-key.pem \
        -out server.csr -subj /CN=localhost 2>/dev/null
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
        -extfile server.ext -out server/server-cert.pem 2>/dev/null
    cp ca-cert.pem server/ && cp ca-cert.pem client/
    cd ..
}
make_certs

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never listened" >&2; exit 1; }

plain_port=$(free_port)
qemu-nbd -r -t -e 8 -f qcow2 -b 127.0.0.1 -p "$plain_port" disk.qcow2 &
plain_pid=$!
tls_port=$(free_port)
qemu-nbd -r -t -e 8 -f qcow2 -b 127.0.0.1 -p "$tls_port" \
    --object "tls-creds-x509,id=tls0,dir=$work/pki/server,endpoint=server,verify-peer=off" \
    --tls-creds tls0 disk.qcow2 &
tls_pid=$!
trap 'kill $plain_pid $tls_pid 2>/dev/null' EXIT
wait_port "$plain_port"
wait_port "$tls_port"

# measure CMD... : median wall and CPU seconds, peak RSS KiB, into globals
measure() {
    local rss=0 walls=() cpus=()
    for _ in $(seq "$runs"); do
        rm -f out.tmp out.*.qcow2 out.*.qcow2.manifest
        /usr/bin/time -f '%e %M %U %S' -o time.txt "$@" >/dev/null 2>time.err || { cat time.err >&2; exit 1; }
        read -r wall kib user sys <time.txt
        walls+=("$wall"); cpus+=("$(awk "BEGIN{print $user + $sys}")")
        [ "$kib" -gt "$rss" ] && rss=$kib
    done
    WALL=$(median "${walls[@]}"); CPU=$(median "${cpus[@]}"); RSS=$rss
}
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

printf '%-26s %8s %8s %8s\n' case wall_s cpu_s rss_MiB
row() { printf '%-26s %8.2f %8.2f %8.1f\n' "$1" "$WALL" "$CPU" "$(awk "BEGIN{print $RSS/1024}")"; }

measure "$qb" backup --compress zstd "nbd://127.0.0.1:$plain_port" out.plain.qcow2
plain_wall=$WALL; row "qbackup nbd:// zstd"
measure "$qb" backup --compress zstd --tls-certs "$work/pki/client" "nbds://127.0.0.1:$tls_port" out.tls.qcow2
tls_wall=$WALL; row "qbackup nbds:// zstd"
"$qb" backup --compress zstd --tls-certs "$work/pki/client" "nbds://127.0.0.1:$tls_port" out.check.qcow2 2>/dev/null
qemu-img compare -q disk.qcow2 out.check.qcow2 || { echo "TLS backup differs from the image!" >&2; exit 1; }
measure qemu-img convert -m 16 -W -c -O qcow2 -o compression_type=zstd \
    --object "tls-creds-x509,id=tls0,dir=$work/pki/client,endpoint=client" \
    --image-opts "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$tls_port,tls-creds=tls0" \
    out.qemu.qcow2
qemu_wall=$WALL; row "qemu-img convert -c (TLS)"
printf 'TLS/plain: %.2fx (target <= 1.1)   TLS/qemu-img: %.2fx (target <= 0.6)\n' \
    "$(awk "BEGIN{print $tls_wall/$plain_wall}")" "$(awk "BEGIN{print $tls_wall/$qemu_wall}")"
rm -f out.*.qcow2 out.*.qcow2.manifest

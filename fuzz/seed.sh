#!/bin/sh
# Makes the seed corpora under fuzz/seeds/TARGET/ (committed; rerun after
# changing what a target expects). Needs qemu-img, qemu-io, qemu-nbd,
# python3, zstd and nightly cargo-fuzz. Small on purpose: 512-byte
# clusters and tiny virtual sizes keep libFuzzer's -max_len low.
set -eu
cd "$(dirname "$0")"
seeds=$PWD/seeds
tmp=$(mktemp -d)
trap 'kill $nbd_pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
nbd_pid=

mkdir -p "$seeds/qcow2_image" "$seeds/codec" "$seeds/nbd_proto" "$seeds/nbd_client"

# --- qcow2 images: every kind of cluster, both codecs, a bitmap, v2,
# extended L2, a backing file name, an external data file.
q() { qemu-io -f qcow2 "$@" >/dev/null; }
img() { # NAME SIZE OPTIONS
  qemu-img create -q -f qcow2 -o "$3" "$tmp/$1" "$2"
}
writes() { # IMG: data, compressed, zero clusters and a discard
  q -c 'write -P 0x11 0 1k' -c 'write -c -P 0x22 4k 512' -c 'write -c -P 0x23 5k 512' \
    -c 'write -z 8k 1k' -c 'write -P 0x33 12k 512' -c 'discard 12k 512' "$1"
}
img zlib.qcow2 32k cluster_size=512
writes "$tmp/zlib.qcow2"
img zstd.qcow2 32k cluster_size=512,compression_type=zstd
writes "$tmp/zstd.qcow2"
img bitmap.qcow2 32k cluster_size=512
qemu-img bitmap --add -g 512 "$tmp/bitmap.qcow2" b0
qemu-img bitmap --add -g 4096 --disable "$tmp/bitmap.qcow2" b1
writes "$tmp/bitmap.qcow2"
img v2.qcow2 32k cluster_size=512,compat=0.10
q -c 'write -P 0x44 0 512' -c 'write -c -P 0x45 1k 512' "$tmp/v2.qcow2"
img ext.qcow2 64k cluster_size=16k,extended_l2=on
q -c 'write -P 0x55 0 1k' -c 'write -z 20k 2k' -c 'write -c -P 0x56 32k 16k' "$tmp/ext.qcow2"
img base.qcow2 32k cluster_size=512
img backing.qcow2 32k cluster_size=512,backing_file=base.qcow2,backing_fmt=qcow2
q -c 'write -P 0x66 512 512' "$tmp/backing.qcow2"
img data.qcow2 32k "cluster_size=512,data_file=$tmp/data.raw,data_file_raw=on"
q -c 'write -P 0x77 0 1k' "$tmp/data.qcow2"
cp "$tmp"/*.qcow2 "$seeds/qcow2_image/"

# --- codec: byte 0 = codec (bit 0) and cluster size (bits 1-3: 512 << n).
python3 - "$seeds/codec" <<'PY'
import os, sys, zlib
out = sys.argv[1]
for n, data in [(0, b"\x22" * 512), (1, bytes(range(256)) * 4)]:
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    stream = c.compress(data) + c.flush()
    sel = 0 | (n << 1)
    open(os.path.join(out, f"zlib{n}"), "wb").write(bytes([sel]) + stream + b"\0" * 7)
PY
head -c 512 /dev/zero | tr '\0' 'z' > "$tmp/c512"
zstd -q -c "$tmp/c512" > "$tmp/c512.zst"
printf '\001' | cat - "$tmp/c512.zst" > "$seeds/codec/zstd0"

# --- NBD decoders: byte 0 picks the decoder.
python3 - "$seeds/nbd_proto" <<'PY'
import os, struct, sys
out = sys.argv[1]
def w(name, sel, p): open(os.path.join(out, name), "wb").write(bytes([sel]) + p)
w("optrep", 0, struct.pack(">QIII", 0x3e889045565a9, 7, 1, 0))
w("info_export", 1, struct.pack(">HQH", 0, 1 << 20, 3))
w("info_bs", 1, struct.pack(">HIII", 3, 1, 4096, 1 << 25))
w("meta", 2, struct.pack(">I", 1) + b"base:allocation")
w("simple", 3, struct.pack(">IIQ", 0x67446698, 0, 1))
w("chunk", 3, struct.pack(">IHHQI", 0x668e33ef, 1, 1, 1, 8))
w("ext", 3, struct.pack(">IHHQQQ", 0x6e8a278c, 1, 6, 1, 0, 24))
w("err", 4, struct.pack(">HIH", 0x8001, 5, 3) + b"bad")
w("erroff", 4, struct.pack(">HIH", 0x8002, 5, 0) + struct.pack(">Q", 512))
w("hole", 5, struct.pack(">QI", 0, 4096))
w("bs", 6, struct.pack(">III", 1, 4096, 3))
w("bsext", 7, struct.pack(">IIQQ", 1, 1, 4096, 3))
PY

# --- NBD sessions: the client's fixed requests relayed to qemu-nbd, and
# what the server answered recorded; byte 0 = the client's options.
cargo +nightly fuzz build nbd_client >/dev/null 2>&1
bin=$(ls -d target/*/release/nbd_client | head -1)
qemu-img create -q -f qcow2 -o cluster_size=512 "$tmp/nbd.qcow2" 64k
qemu-img bitmap --add "$tmp/nbd.qcow2" b0
q -c 'write -P 0x11 0 4k' -c 'write -z 8k 4k' "$tmp/nbd.qcow2"
# A read-only export takes only a disabled bitmap.
qemu-img bitmap --disable "$tmp/nbd.qcow2" b0
mkdir "$tmp/empty"
for sel in 0 1 2 3 4 5 7; do
  qemu-nbd -t -r -f qcow2 -B b0 -k "$tmp/nbd.sock" "$tmp/nbd.qcow2" & nbd_pid=$!
  while ! grep -q "$tmp/nbd.sock" /proc/net/unix; do sleep 0.05; done
  printf "\\$(printf %03o "$sel")" > "$tmp/empty/sel"
  QBACKUP_FUZZ_NBD_UPSTREAM=$tmp/nbd.sock QBACKUP_FUZZ_NBD_RECORD=$tmp/said \
    "$bin" "$tmp/empty/sel" >/dev/null 2>&1
  kill $nbd_pid
  wait $nbd_pid || true
  nbd_pid=
  rm -f "$tmp/nbd.sock"
  cat "$tmp/empty/sel" "$tmp/said" > "$seeds/nbd_client/session$sel"
done
du -sh "$seeds"/*

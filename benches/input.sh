# The benchmarks' input (DEVELOPERS.md), built once per work directory;
# sourced by compare.sh, ab.sh and incremental.sh. Run in the work directory.
#   disk.raw / disk.qcow2: an ext4 file system filled from
#     /usr/lib/x86_64-linux-gnu, 3 GiB, converted to qcow2;
#   top.qcow2 (bench_top): an overlay with ~10 % of the allocated data
#     rewritten with real content (pieces of the disk itself, shifted), so
#     that it compresses realistically.

bench_disk() {
    [ -f disk.qcow2 ] && return 0
    echo "building the input image in $PWD ..." >&2
    mke2fs -q -t ext4 -d /usr/lib/x86_64-linux-gnu -F disk.raw 3G
    qemu-img convert -O qcow2 disk.raw disk.qcow2
}

bench_top() {
    [ -f top.qcow2 ] && return 0
    qemu-img create -q -f qcow2 -b disk.qcow2 -F qcow2 top.qcow2
    local alloc chunk n i off src
    alloc=$(qemu-img map --output=json disk.qcow2 | python3 -c '
import json,sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
    chunk=$((4 << 20))
    n=$((alloc / 10 / chunk))
    for i in $(seq 0 $((n - 1))); do
        off=$(( (i * 2654435761 % (3072 / 4)) * chunk ))
        src=$(( ((i * 40503 + 17) % (600 / 4)) * chunk ))
        dd if=disk.raw of=chunk.bin bs=$chunk skip=$((src / chunk)) count=1 status=none
        qemu-io -f qcow2 -c "write -s chunk.bin $off $chunk" top.qcow2 >/dev/null
    done
    rm -f chunk.bin
}

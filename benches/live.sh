#!/usr/bin/env bash
# Live backup of a running VM (backup --qmp) against qemu-img convert -c
# from the same fleecing export. Input: the realistic 3 GiB image
# (benches/input.sh) as the VM's only disk. Rows: qbackup live full,
# qemu-img convert -c -O qcow2 (zstd) from the export qbackup set up
# (held open with the QBACKUP_TEST_HOLD=exported hook, then the held run is
# killed and the next run repairs it), and a live incremental after ~300 MiB
# of guest writes. ROUNDS=N interleaved rounds (default 3); medians, min-max.
# Usage: benches/live.sh [WORKDIR]   (default /tmp/qbackup-bench)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${QBACKUP:-$here/../target/release/qbackup}"
work="${1:-/tmp/qbackup-bench}"
rounds="${ROUNDS:-3}"
mkdir -p "$work"; cd "$work"
# shellcheck source=input.sh
. "$here/input.sh"
bench_disk

vm_start() {
    rm -f vm.qmp t.qmp
    qemu-img create -q -f qcow2 -b disk.qcow2 -F qcow2 live.qcow2
    qemu-system-x86_64 -machine pc -accel tcg -S -nodefaults -display none \
        -qmp unix:vm.qmp,server=on,wait=off -qmp unix:t.qmp,server=on,wait=off \
        -blockdev driver=qcow2,node-name=d0,file.driver=file,file.filename=live.qcow2 \
        -device virtio-blk-pci,drive=d0,id=vda &
    vm_pid=$!
    while [ ! -S vm.qmp ] || [ ! -S t.qmp ]; do sleep 0.1; done
}
vm_stop() { kill "$vm_pid"; wait "$vm_pid" 2>/dev/null || true; rm -f live.qcow2; }
hmp() {  # a guest write through the device, over the test's QMP socket
    python3 - "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect("t.qmp"); f = s.makefile("rw")
f.readline()
for cmd in ({"execute": "qmp_capabilities"},
            {"execute": "human-monitor-command", "arguments": {"command-line":
             'qemu-io -d /machine/peripheral/vda/virtio-backend "%s"' % sys.argv[1]}}):
    f.write(json.dumps(cmd) + "\n"); f.flush()
    while "event" in json.loads(f.readline()): pass
PY
}
secs() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $s" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f s (%.2f-%.2f)", m, a[1], a[NR]}'; }

: > full.t; : > qimg.t; : > inc.t
for r in $(seq "$rounds"); do
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    vm_start
    rm -rf set
    secs "$bin" backup --qmp vm.qmp set >> full.t
    # qemu-img from the same kind of export: a cycle held with its export up.
    QBACKUP_TEST_HOLD=exported "$bin" backup --qmp vm.qmp --sync full set 2>hold.err &
    held=$!
    until grep -q "test hold" hold.err 2>/dev/null; do sleep 0.1; done
    sock=$(python3 -c 'import json;print(json.load(open("set/.qbackup-live.json"))["socket_dir"])')/nbd.sock
    rm -f q.qcow2
    secs qemu-img convert -m 16 -W -c -o compression_type=zstd -O qcow2 \
        "nbd+unix:///vda?socket=$sock" q.qcow2 >> qimg.t
    kill -9 "$held"; wait "$held" 2>/dev/null || true
    "$bin" backup --qmp vm.qmp -q --sync full set   # repairs the held cycle
    for i in $(seq 0 9); do hmp "write -P $((i + 1)) $((i * 300))M 30M"; done
    secs "$bin" backup --qmp vm.qmp set >> inc.t
    vm_stop
done
printf '| case | time (median, min-max of %s) |\n| --- | --- |\n' "$rounds"
printf '| qbackup --qmp, full, zstd | %s |\n' "$(median < full.t)"
printf '| qemu-img convert -c (zstd) from the export | %s |\n' "$(median < qimg.t)"
printf '| qbackup --qmp, incremental after 300 MiB of writes | %s |\n' "$(median < inc.t)"

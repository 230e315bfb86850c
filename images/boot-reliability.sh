#!/usr/bin/env bash
# Measures how reliably the nested setup boots: N times, a fresh QEMU TCG test host runs
# the usual two-node guest to READY and through its memory plug, then powers off
# (tests/examples/boot_probe.rs, which never retries). Each boot is one row of
# <out>/results.tsv: its outcome (ok, guest-death, testhost-died, testhost-froze, error;
# workload-failed: a step of --mode's workload failed while the guest's VMM still ran),
# the phase times and the 1-minute load average before and after; its console goes to
# <out>/boot-<qemu version>-<condition>-<n>.log.
#
#   images/boot-reliability.sh [-n N] [--qemu QEMU]... [--mode MODE]... [--label L]
#                              [--out DIR] [--lock FILE] [--idle LOAD] [--beside 'COMMAND']
#   images/boot-reliability.sh --summary results.tsv...
#
#   --qemu QEMU      the test host's QEMU binary (default $MEMPOWER_QEMU, else
#                    qemu-system-x86_64); given several times, each round boots each
#                    once, so that they share the machine's conditions
#   --mode MODE      what each boot runs inside the test host (default boot):
#                      boot                 boot_probe: boot, plug, power off
#                      mempower             reset_control: boot, plug, fill 384 MiB per
#                                           node, unplug 256 MiB per node, power off
#                      mempower-nohotplug   the same without virtio-mem: boot, fill
#                      qemu                 the mempower workload with QEMU+KVM as the
#                                           inner VMM (the control experiment)
#                    given several times, each round runs each mode in turn; the
#                    condition column is the mode (the label for boot; L-MODE with --label)
#   --idle LOAD      before each boot, wait until the load average is below LOAD and no
#                    rustc or cc1 runs (polled every 10 s)
#   --beside CMD     run CMD again and again in the background during the series (a
#                    build, to measure under load); stopped at the end
#   --lock FILE      hold flock(FILE) during each boot, not between boots
#
# Images come from build.sh, unless all four MEMPOWER_{,TESTHOST_}{KERNEL,INITRAMFS} are set.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
die() { printf 'boot-reliability.sh: error: %s\n' "$*" >&2; exit 2; }
log() { printf '[boot-reliability %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Prints one table row per (qemu, condition) of the given results files.
summary() {
    awk -F'\t' '
        function median(list,   n, a, i, j, t) {
            n = split(list, a, " ")
            if (n == 0) return "-"
            for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return (n % 2) ? a[(n + 1) / 2] : sprintf("%.1f", (a[n / 2] + a[n / 2 + 1]) / 2)
        }
        function max(list,   n, a, i, m) {
            n = split(list, a, " "); if (n == 0) return "-"
            m = a[1]; for (i = 2; i <= n; i++) if (a[i] + 0 > m + 0) m = a[i]
            return m
        }
        FNR == 1 { next }
        {
            k = $3 "\t" $4; if (!(k in boots)) order[++nk] = k
            boots[k]++; count[k, $5]++
            if ($6 != "-") up[k] = up[k] " " $6
            if ($7 != "-") ready[k] = ready[k] " " $7
            if ($5 == "ok") { total[k] = total[k] " " $9 }
            if ($13 != "" && $13 != "-") fill[k] = fill[k] " " $13
            if ($14 != "" && $14 != "-") unplug[k] = unplug[k] " " $14
            load[k] = load[k] " " $10 " " $11
        }
        END {
            print "| QEMU | condition | boots | ok | guest deaths | workload failed | test host died | froze | error | test host up, median / max (s) | L2 to READY, median / max (s) | round trip of ok boots, median / max (s) | fill, median / max (s) | unplug, median / max (s) | load avg, median / max |"
            print "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            for (i = 1; i <= nk; i++) {
                k = order[i]; split(k, kk, "\t")
                printf "| %s | %s | %d | %d | %d | %d | %d | %d | %d | %s / %s | %s / %s | %s / %s | %s / %s | %s / %s | %s / %s |\n", kk[1], kk[2], boots[k],
                    count[k, "ok"], count[k, "guest-death"], count[k, "workload-failed"], count[k, "testhost-died"], count[k, "testhost-froze"], count[k, "error"],
                    median(up[k]), max(up[k]), median(ready[k]), max(ready[k]), median(total[k]), max(total[k]),
                    median(fill[k]), max(fill[k]), median(unplug[k]), max(unplug[k]), median(load[k]), max(load[k])
            }
        }' "$@"
}

n=20 label="" out="" lock="" idle="" beside="" qemus=() modes=()
while [ $# -gt 0 ]; do
    case $1 in
        -n) n=${2:?}; shift 2 ;;
        --qemu) qemus+=("${2:?}"); shift 2 ;;
        --label) label=${2:?}; shift 2 ;;
        --mode) modes+=("${2:?}"); shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --lock) lock=${2:?}; shift 2 ;;
        --idle) idle=${2:?}; shift 2 ;;
        --beside) beside=${2:?}; shift 2 ;;
        --summary) shift; [ $# -gt 0 ] || die "--summary needs results files"; summary "$@"; exit 0 ;;
        *) die "unknown argument $1 (see the comment at the top of $0)" ;;
    esac
done
case $n in '' | *[!0-9]*) die "-n needs a number" ;; esac
case $label in *[[:space:]]*) die "--label must not contain blanks" ;; esac
[ ${#modes[@]} -gt 0 ] || modes=(boot)
for m in "${modes[@]}"; do
    case $m in boot | mempower | mempower-nohotplug | qemu) ;; *) die "unknown --mode $m (boot, mempower, mempower-nohotplug, qemu)" ;; esac
done
# The results' condition column: the label for boot (as before modes), else the mode.
condition() {
    case $1 in
        boot) echo "${label:-run}" ;;
        *) echo "${label:+$label-}$1" ;;
    esac
}
out=${out:-$root/target/boot-reliability}
mkdir -p "$out"
results="$out/results.tsv"
[ -f "$results" ] || printf 'n\tstart\tqemu\tcondition\toutcome\ttesthost_up_s\tready_s\tplugged_s\ttotal_s\tload_start\tload_end\tnote\tfill_s\tunplug_s\n' > "$results"

[ ${#qemus[@]} -gt 0 ] || qemus=("${MEMPOWER_QEMU:-qemu-system-x86_64}")
versions=()
for q in "${qemus[@]}"; do
    v=$("$q" --version | awk 'NR == 1 {print $4}') && [ -n "$v" ] || die "cannot run $q --version"
    versions+=("$v")
    log "QEMU $v ($q): $n boots of each mode (${modes[*]}), results in $results"
done

# Build everything once, so that no boot builds and each boot's time is the boot's.
if [ -z "${MEMPOWER_KERNEL:-}" ] || [ -z "${MEMPOWER_INITRAMFS:-}" ] \
    || [ -z "${MEMPOWER_TESTHOST_KERNEL:-}" ] || [ -z "${MEMPOWER_TESTHOST_INITRAMFS:-}" ]; then
    while IFS= read -r line; do
        case $line in MEMPOWER_*=*) export "${line?}" ;; esac
    done < <(for what in kernel initramfs testhost; do "$here/build.sh" "$what"; done)
    [ -n "${MEMPOWER_KERNEL:-}" ] && [ -n "${MEMPOWER_INITRAMFS:-}" ] && [ -n "${MEMPOWER_TESTHOST_KERNEL:-}" ] \
        && [ -n "${MEMPOWER_TESTHOST_INITRAMFS:-}" ] || die "images/build.sh did not give every image"
fi
if [[ " ${modes[*]} " == *" qemu "* ]] && [ -z "${MEMPOWER_QEMU_KERNEL:-}" ]; then
    line=$("$here/build.sh" qemu-kernel) || die "images/build.sh qemu-kernel failed"
    export "${line?}"
fi
(cd "$root" && cargo build --release -q -p vmm --bin mempower \
    && cargo build --release -q -p mempower-tests --example boot_probe --example reset_control)
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir="$root/$tdir" ;; esac
export MEMPOWER_BIN="$tdir/release/mempower"
examples="$tdir/release/examples"

loader=""
if [ -n "$beside" ]; then
    log "beside the boots, again and again: $beside"
    setsid bash -c "while :; do $beside; done" >"$out/beside-${label:-run}.log" 2>&1 &
    loader=$!
    trap 'kill -- -$loader 2>/dev/null || true' EXIT
fi

load1() { cut -d' ' -f1 /proc/loadavg; }
is_idle() {
    awk -v l="$(load1)" -v max="$idle" 'BEGIN { exit !(l < max) }' && ! pgrep -x rustc >/dev/null && ! pgrep -x cc1 >/dev/null
}
phase() { sed -n "s/^phase: $1: \([0-9.]*\) s.*/\1/p" "$2" | tail -1 | grep . || echo -; }

for round in $(seq "$n"); do
  for q in "${!qemus[@]}"; do
  for mode in "${modes[@]}"; do
    qemu=${qemus[$q]} qemu_version=${versions[$q]} cond=$(condition "$mode")
    case $mode in
        boot) probe=("$examples/boot_probe") limit=600 ;;
        *) probe=("$examples/reset_control" --mode "$mode") limit=1500 ;;
    esac
    i=$(($(awk -F'\t' -v l="$cond" -v v="$qemu_version" '$3 == v && $4 == l' "$results" | wc -l) + 1))
    logf="$out/boot-$qemu_version-$cond-$i.log"
    while :; do
        if [ -n "$idle" ]; then
            until is_idle; do sleep 10; done
        fi
        if [ -n "$lock" ]; then exec 8>"$lock"; flock 8; fi
        # Another user of the lock may have left the machine busy.
        if [ -z "$idle" ] || is_idle; then break; fi
        if [ -n "$lock" ]; then exec 8>&-; fi
    done
    start=$(date +%H:%M:%S) l0=$(load1)
    MEMPOWER_QEMU=$qemu timeout "$limit" "${probe[@]}" > "$logf" 2>&1 8>&- || true
    l1=$(load1)
    if [ -n "$lock" ]; then exec 8>&-; fi
    result=$(sed -n -E 's/^(boot-probe|reset-control): outcome //p' "$logf" | tail -1)
    result=${result:-error}
    note=$(grep -m1 -o -E 'Kernel panic - not syncing: .*|BUG: .*|triple fault.*|(boot-probe|reset-control): guest death: .*|reset-control: workload failed.*|printed nothing for .*' "$logf" | cut -c1-120 | tr '\t' ' ' || true)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$start" "$qemu_version" "$cond" "$result" \
        "$(phase 'test host up' "$logf")" "$(phase 'guest READY' "$logf")" "$(phase 'guest plugged' "$logf")" \
        "$(phase 'test host total' "$logf")" "$l0" "$l1" "${note:--}" \
        "$(phase 'fill' "$logf")" "$(phase 'unplug' "$logf")" >> "$results"
    log "QEMU $qemu_version $cond boot $i: $result (load $l0 -> $l1) ${note}"
  done
  done
done
summary "$results"

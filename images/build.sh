#!/usr/bin/env bash
# Builds mempower's images: the guest kernel (vmlinux), the guest initramfs
# (guest-agent as /init) and the nested test host (Debian kernel + busybox initramfs).
#
#   images/build.sh [all|kernel|initramfs|testhost]
#
# Progress goes to stderr. Stdout gets one KEY=PATH line per image, which is what the
# test harness parses. Expensive outputs are cached outside the checkout, in
# ${MEMPOWER_CACHE:-$HOME/.cache/mempower}, keyed by a hash of everything they are built from.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${MEMPOWER_CACHE:-$HOME/.cache/mempower}
jobs=$(nproc)
mkdir -p "$cache"
# One build at a time: tests and the demo may call this concurrently.
exec 9>"$cache/.lock"
flock 9

# Bump when a recipe below changes what it produces; cosmetic edits keep the caches.
KERNEL_RECIPE=1
TESTHOST_RECIPE=2

# Keeps the few most recently used cache entries of a kind (e.g. kernel-*), so old keys
# don't pile up, while checkouts that build different keys at once (branches, CI beside
# a developer) don't delete each other's images. `$keep` is marked used first.
KEEP_ENTRIES=4
prune_except() {
    local keep=$1 kind=$2
    touch "$keep"
    ls -1dt "$cache/$kind"-* 2>/dev/null | tail -n +$((KEEP_ENTRIES + 1)) | while IFS= read -r d; do
        [ "$d" = "$keep" ] || rm -rf "$d"
    done
}

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'images/build.sh: error: %s\n' "$*" >&2; exit 1; }

# Installs missing Debian packages when running as root (CI does); otherwise names them.
apt_updated=0
need_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})"
    fi
    log "installing ${missing[*]}"
    if [ $apt_updated -eq 0 ]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# The kernel's own initramfs writer: lets us create /dev/console without being root.
gen_init_cpio() {
    local tool="$cache/tools/gen_init_cpio"
    if [ ! -x "$tool" ]; then
        need_packages linux-source-6.1 build-essential xz-utils
        log "building gen_init_cpio from linux-source-6.1"
        local tmp; tmp=$(mktemp -d)
        tar -C "$tmp" -xf /usr/src/linux-source-6.1.tar.xz linux-source-6.1/usr/gen_init_cpio.c
        mkdir -p "$cache/tools"
        cc -O2 -o "$tool" "$tmp/linux-source-6.1/usr/gen_init_cpio.c"
        rm -rf "$tmp"
    fi
    echo "$tool"
}

build_kernel() {
    need_packages linux-source-6.1 build-essential flex bison bc libelf-dev xz-utils
    local srcver key out
    srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
    key=$( { echo "$srcver recipe $KERNEL_RECIPE"; cat "$here/guest-kernel.config";
             cat "$here"/patches/*.patch 2>/dev/null || true; } | sha256sum | cut -c1-16)
    out="$cache/kernel-$key"
    if [ -f "$out/vmlinux" ]; then
        touch "$out"; log "guest kernel: cached ($out)"
    else
        local build="$cache/build-kernel-$key"
        rm -rf "$cache"/build-kernel-*; mkdir -p "$build"  # also drops builds that failed earlier
        log "guest kernel: extracting linux-source $srcver"
        tar -C "$build" -xf /usr/src/linux-source-6.1.tar.xz
        local src="$build/linux-source-6.1"
        for p in "$here"/patches/*.patch; do
            [ -e "$p" ] || continue
            log "applying $(basename "$p")"
            patch -d "$src" -p1 < "$p" >&2
        done
        log "guest kernel: configuring (tinyconfig + images/guest-kernel.config)"
        make -C "$src" -s tinyconfig >/dev/null 2>&1
        (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$here/guest-kernel.config" >/dev/null)
        make -C "$src" -s olddefconfig >&2
        # Kconfig silently drops options whose dependencies are unmet; refuse that.
        local bad=0
        while IFS= read -r line; do
            case "$line" in
                CONFIG_*=*) grep -qxF "$line" "$src/.config" || { log "option not applied: $line"; bad=1; } ;;
                "# CONFIG_"*" is not set")
                    local opt=${line#\# }; opt=${opt%% *}
                    if grep -q "^$opt=" "$src/.config"; then log "option still set: $opt"; bad=1; fi ;;
            esac
        done < "$here/guest-kernel.config"
        [ $bad -eq 0 ] || die "guest-kernel.config does not apply cleanly"
        log "guest kernel: compiling vmlinux with $jobs jobs (about 8 minutes on 2 cores)"
        local t0=$SECONDS
        make -C "$src" -j"$jobs" vmlinux >"$build/make.log" 2>&1 || { tail -30 "$build/make.log" >&2; die "kernel build failed"; }
        mkdir -p "$out.tmp"
        cp "$src/vmlinux" "$src/.config" "$out.tmp/"
        rm -rf "$out"; mv "$out.tmp" "$out"
        rm -rf "$build"
        log "guest kernel: built in $((SECONDS - t0)) s"
        prune_except "$out" kernel
    fi
    log "guest kernel: vmlinux $(du -h "$out/vmlinux" | cut -f1)"
    echo "MEMPOWER_KERNEL=$out/vmlinux"
}

build_initramfs() {
    local cpio_tool agent out spec
    cpio_tool=$(gen_init_cpio)
    log "guest initramfs: building static guest-agent"
    # Naming --target keeps crt-static off build scripts and proc-macros.
    (cd "$root" && RUSTFLAGS='-C target-feature=+crt-static -C strip=debuginfo' cargo build --release -q \
        -p guest-agent --target x86_64-unknown-linux-gnu) >&2
    local tdir=${CARGO_TARGET_DIR:-target}
    case $tdir in /*) ;; *) tdir="$root/$tdir" ;; esac
    agent="$tdir/x86_64-unknown-linux-gnu/release/guest-agent"
    # A static binary names no shared libraries ("=> /lib/...") in ldd's output.
    if ldd "$agent" 2>&1 | grep -q '=>'; then die "guest-agent is not statically linked"; fi
    out="$root/target/images"
    mkdir -p "$out"
    spec="$out/initramfs.spec"
    cat > "$spec" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
file /init $agent 0755 0 0
EOF
    # Uncompressed on purpose: the guest's inflate would run at emulated speed in nested setups.
    "$cpio_tool" "$spec" > "$out/initramfs.cpio"
    log "guest initramfs: $(du -h "$out/initramfs.cpio" | cut -f1) uncompressed cpio"
    echo "MEMPOWER_INITRAMFS=$out/initramfs.cpio"
}

build_testhost() {
    need_packages qemu-system-x86 busybox-static
    local pkg ver key out cpio_tool
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        [ "$(id -u)" -eq 0 ] && { apt-get update -qq >&2; apt_updated=1; }
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || die "cannot resolve Debian's linux-image-amd64 to a kernel package (apt-get update?)"
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    key=$( { echo "$pkg $ver recipe $TESTHOST_RECIPE"; cat "$here/testhost-init"; } | sha256sum | cut -c1-16)
    out="$cache/testhost-$key"
    if [ -f "$out/initramfs.cpio.gz" ]; then
        touch "$out"; log "test host: cached ($out, $pkg $ver)"
    else
        local tmp; tmp=$(mktemp -d)
        # The kernel package is kept apart, so that editing testhost-init needs no download.
        local deb="$cache/deb-$pkg-$ver"
        if [ ! -d "$deb" ]; then
            log "test host: fetching $pkg $ver"
            (cd "$tmp" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
            dpkg-deb -x "$tmp"/*.deb "$deb.tmp" && mv "$deb.tmp" "$deb"
            prune_except "$deb" deb
        fi
        mkdir -p "$tmp/root" && ln -s "$deb"/* "$tmp/root/"
        local kver=${pkg#linux-image-}
        local moddir="$tmp/root/lib/modules/$kver/kernel"
        [ -d "$moddir" ] || die "no modules in $pkg"
        cpio_tool=$(gen_init_cpio)
        local spec="$tmp/spec"
        {
            echo "dir /dev 0755 0 0"
            echo "nod /dev/console 0600 0 0 c 5 1"
            echo "dir /bin 0755 0 0"; echo "dir /proc 0755 0 0"; echo "dir /sys 0755 0 0"
            echo "dir /host 0755 0 0"; echo "dir /modules 0755 0 0"
            echo "file /bin/busybox /bin/busybox 0755 0 0"
            echo "slink /bin/sh busybox 0777 0 0"
            echo "file /init $here/testhost-init 0755 0 0"
        } > "$spec"
        # Load order matters: each module after the ones it depends on.
        local order="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p overlay irqbypass kvm ccp kvm-amd"
        local i=0
        for m in $order; do
            local f; f=$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" \) | head -1)
            [ -n "$f" ] || die "module $m not found in $pkg"
            case "$f" in *.xz) xz -dc "$f" > "$tmp/$m.ko" ; f="$tmp/$m.ko" ;; esac
            printf 'file /modules/%02d-%s.ko %s 0644 0 0\n' $i "$m" "$f" >> "$spec"
            i=$((i + 1))
        done
        mkdir -p "$out.tmp"
        cp "$tmp/root/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
        "$cpio_tool" "$spec" | gzip -1 > "$out.tmp/initramfs.cpio.gz"
        echo "$pkg $ver" > "$out.tmp/VERSION"
        rm -rf "$out"; mv "$out.tmp" "$out"
        rm -rf "$tmp"
        prune_except "$out" testhost
        log "test host: ready ($pkg $ver)"
    fi
    echo "MEMPOWER_TESTHOST_KERNEL=$out/vmlinuz"
    echo "MEMPOWER_TESTHOST_INITRAMFS=$out/initramfs.cpio.gz"
}

case "${1:-all}" in
    kernel) build_kernel ;;
    initramfs) build_initramfs ;;
    testhost) build_testhost ;;
    all) build_kernel; build_initramfs; build_testhost ;;
    *) die "usage: images/build.sh [all|kernel|initramfs|testhost]" ;;
esac

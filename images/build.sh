#!/usr/bin/env bash
# Builds mempower's images: the guest kernel (vmlinux), the guest initramfs
# (guest-agent as /init), the nested test host (Debian kernel + busybox initramfs) and a
# Debian guest (Debian's kernel and initrd, a bookworm root disk with the agent service).
#
#   images/build.sh [all|kernel|qemu-kernel|initramfs|testhost|debian]
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
TESTHOST_RECIPE=3
DEBIAN_RECIPE=1

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

# `build_kernel` builds the guest kernel mempower boots (`vmlinux`). `build_kernel qemu`
# builds the same source, patches and config plus guest-kernel-qemu.config (virtio-pci,
# which QEMU's virtio-mem needs) as a bzImage, which QEMU boots: the control experiment
# of images/README.md runs the same guest under QEMU as the inner VMM.
build_kernel() {
    need_packages linux-source-6.1 build-essential flex bison bc libelf-dev xz-utils
    local variant=${1:-} srcver key out kind=kernel target=vmlinux var=MEMPOWER_KERNEL
    local configs=("$here/guest-kernel.config")
    if [ "$variant" = qemu ]; then
        kind=qemu-kernel target=bzImage var=MEMPOWER_QEMU_KERNEL
        configs+=("$here/guest-kernel-qemu.config")
    fi
    srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
    key=$( { echo "$srcver recipe $KERNEL_RECIPE"; cat "${configs[@]}";
             cat "$here"/patches/*.patch 2>/dev/null || true; } | sha256sum | cut -c1-16)
    out="$cache/$kind-$key"
    local image=$out/$target
    if [ -f "$image" ]; then
        touch "$out"; log "guest $kind: cached ($out)"
    else
        local build="$cache/build-$kind-$key"
        rm -rf "$cache"/build-"$kind"-*; mkdir -p "$build"  # also drops builds that failed earlier
        log "guest $kind: extracting linux-source $srcver"
        tar -C "$build" -xf /usr/src/linux-source-6.1.tar.xz
        local src="$build/linux-source-6.1"
        for p in "$here"/patches/*.patch; do
            [ -e "$p" ] || continue
            log "applying $(basename "$p")"
            patch -d "$src" -p1 < "$p" >&2
        done
        log "guest $kind: configuring (tinyconfig + ${configs[*]##*/})"
        make -C "$src" -s tinyconfig >/dev/null 2>&1
        (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "${configs[@]}" >/dev/null)
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
        done < <(cat "${configs[@]}")
        [ $bad -eq 0 ] || die "${configs[*]##*/} do not apply cleanly"
        log "guest $kind: compiling $target with $jobs jobs (about 8 minutes on 2 cores)"
        local t0=$SECONDS
        make -C "$src" -j"$jobs" "$target" >"$build/make.log" 2>&1 || { tail -30 "$build/make.log" >&2; die "kernel build failed"; }
        mkdir -p "$out.tmp"
        cp "$src/.config" "$out.tmp/"
        case $target in
            vmlinux) cp "$src/vmlinux" "$out.tmp/" ;;
            bzImage) cp "$src/arch/x86/boot/bzImage" "$out.tmp/" ;;
        esac
        rm -rf "$out"; mv "$out.tmp" "$out"
        rm -rf "$build"
        log "guest $kind: built in $((SECONDS - t0)) s"
        prune_except "$out" "$kind"
    fi
    log "guest $kind: $target $(du -h "$image" | cut -f1)"
    echo "$var=$image"
}

# Builds the static guest-agent and prints its path.
build_agent() {
    log "building static guest-agent"
    # Naming --target keeps crt-static off build scripts and proc-macros.
    (cd "$root" && RUSTFLAGS='-C target-feature=+crt-static -C strip=debuginfo' cargo build --release -q \
        -p guest-agent --target x86_64-unknown-linux-gnu) >&2
    local tdir=${CARGO_TARGET_DIR:-target}
    case $tdir in /*) ;; *) tdir="$root/$tdir" ;; esac
    local agent="$tdir/x86_64-unknown-linux-gnu/release/guest-agent"
    # A static binary names no shared libraries ("=> /lib/...") in ldd's output.
    if ldd "$agent" 2>&1 | grep -q '=>'; then die "guest-agent is not statically linked"; fi
    echo "$agent"
}

build_initramfs() {
    local cpio_tool agent out spec
    cpio_tool=$(gen_init_cpio)
    agent=$(build_agent)
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

# Resolves Debian's linux-image-amd64 to its kernel package, fetches and extracts it
# once (kept apart, so that editing a recipe needs no download), and prints
# "PACKAGE VERSION DIR". The test host and the Debian guest boot the same kernel.
kernel_deb() {
    local pkg ver
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        [ "$(id -u)" -eq 0 ] && { apt-get update -qq >&2; apt_updated=1; }
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || die "cannot resolve Debian's linux-image-amd64 to a kernel package (apt-get update?)"
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    local deb="$cache/deb-$pkg-$ver"
    if [ ! -d "$deb" ]; then
        local tmp; tmp=$(mktemp -d)
        log "fetching $pkg $ver"
        (cd "$tmp" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
        dpkg-deb -x "$tmp"/*.deb "$deb.tmp" && mv "$deb.tmp" "$deb"
        rm -rf "$tmp"
        prune_except "$deb" deb
    fi
    echo "$pkg $ver $deb"
}

build_testhost() {
    need_packages qemu-system-x86 busybox-static
    local pkg ver key out cpio_tool deb info
    info=$(kernel_deb)
    read -r pkg ver deb <<<"$info"
    key=$( { echo "$pkg $ver recipe $TESTHOST_RECIPE"; cat "$here/testhost-init"; } | sha256sum | cut -c1-16)
    out="$cache/testhost-$key"
    if [ -f "$out/initramfs.cpio.gz" ]; then
        touch "$out"; log "test host: cached ($out, $pkg $ver)"
    else
        local tmp; tmp=$(mktemp -d)
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
        # Load order matters: each module after the ones it depends on. Newer kernels
        # build some in (6.12: virtio, virtio_pci); `?` marks one that may be gone
        # altogether (6.12 merged fscache into netfs). vhost_vsock is for QEMU as the inner
        # VMM (the control experiment of README.md), whose guest agent talks vsock.
        local order="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache? 9pnet 9pnet_virtio 9p overlay irqbypass kvm ccp kvm-amd"
        order+=" vsock vmw_vsock_virtio_transport_common vhost_iotlb vhost vhost_vsock"
        local i=0 builtin="$tmp/root/lib/modules/$kver/modules.builtin"
        for m in $order; do
            local optional=0
            case $m in *\?) m=${m%\?}; optional=1 ;; esac
            local f; f=$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" \) | head -1)
            if [ -z "$f" ]; then
                grep -q "/$m\.ko$" "$builtin" 2>/dev/null && continue
                [ $optional -eq 1 ] && continue
                die "module $m not found in $pkg"
            fi
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

# Debian's mirrors as this machine's apt sources name them ("deb URI SUITE main" lines
# for the bookworm suites), so that no mirror is written down here.
debian_mirrors() {
    apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(ORIGIN)' 'Created-By: Packages' 2>/dev/null \
        | awk -v s="$DEBIAN_SUITE" '$3 == "Debian" && ($2 == s || index($2, s "-") == 1) { print "deb " $1 " " $2 " main" }' \
        | sort -u
}

# The Debian guest: Debian's own kernel (the test host's), an initrd regenerated with
# what mempower's devices need, and a bookworm root disk (raw ext4) with systemd, the
# agent service and a serial getty.
DEBIAN_SUITE=bookworm
DEBIAN_PACKAGES="systemd systemd-sysv udev kmod initramfs-tools e2fsprogs procps"
build_debian() {
    need_packages mmdebstrap e2fsprogs
    local pkg ver deb info kver agent mirrors versions key out
    info=$(kernel_deb)
    read -r pkg ver deb <<<"$info"
    kver=${pkg#linux-image-}
    agent=$(build_agent)
    mirrors=$(debian_mirrors)
    if [ -z "$mirrors" ]; then
        [ "$(id -u)" -eq 0 ] && [ $apt_updated -eq 0 ] && { apt-get update -qq >&2; apt_updated=1; }
        mirrors=$(debian_mirrors)
    fi
    [ -n "$mirrors" ] || die "no Debian $DEBIAN_SUITE source in this machine's apt sources (apt-get update?)"
    # The key: the package list with the versions apt offers now, the kernel, the agent
    # binary, its unit, the customize script and the recipe.
    # shellcheck disable=SC2086
    versions=$(apt-cache policy $DEBIAN_PACKAGES | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p, $2}')
    key=$( { echo "$DEBIAN_SUITE recipe $DEBIAN_RECIPE $pkg $ver"; echo "$versions";
             sha256sum "$agent" | cut -d' ' -f1; cat "$root/guest-agent/mempower-agent.service" \
             "$here/debian-customize.sh"; } | sha256sum | cut -c1-16)
    out="$cache/debian-$key"
    if [ -f "$out/rootfs.ext4" ]; then
        log "debian guest: cached ($out)"
    else
        local t0=$SECONDS tmp
        rm -rf "$cache"/build-debian.*  # what a failed build left
        tmp=$(mktemp -d "$cache/build-debian.XXXXXX")
        log "debian guest: mmdebstrap $DEBIAN_SUITE ($DEBIAN_PACKAGES) from: $(echo "$mirrors" | awk '{print $2, $3}' | paste -sd, -)"
        local mirror_args=()
        while IFS= read -r line; do mirror_args+=("$line"); done <<<"$mirrors"
        # Documentation, man pages and translations are left out: a smaller disk to copy.
        AGENT=$agent UNIT="$root/guest-agent/mempower-agent.service" KDEB=$deb KVER=$kver \
        mmdebstrap --variant=minbase --include="${DEBIAN_PACKAGES// /,}" \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
            --customize-hook="$here/debian-customize.sh \"\$1\"" \
            "$DEBIAN_SUITE" "$tmp/root" "${mirror_args[@]}" >&2 || die "mmdebstrap failed"
        log "debian guest: root file system built in $((SECONDS - t0)) s ($(du -sh "$tmp/root" | cut -f1))"
        mkdir -p "$tmp/out"
        cp "$deb/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
        cp "$tmp/root/boot/initrd.img-$kver" "$tmp/out/initrd.img"
        # Room for the guest to write: used size + 50%, at least 512 MiB, whole MiB.
        local used size
        used=$(du -sm "$tmp/root" | cut -f1)
        size=$(( used * 3 / 2 )); [ $size -ge 512 ] || size=512
        mkfs.ext4 -q -F -L mempower-root -d "$tmp/root" "$tmp/out/rootfs.ext4" "${size}M" >&2 \
            || die "mkfs.ext4 failed"
        echo "$pkg $ver $DEBIAN_SUITE" > "$tmp/out/VERSION"
        rm -rf "$out"; mv "$tmp/out" "$out"
        rm -rf "$tmp"
        prune_except "$out" debian
        log "debian guest: built in $((SECONDS - t0)) s: rootfs.ext4 ${size} MiB ($used MiB used), initrd $(du -h "$out/initrd.img" | cut -f1)"
    fi
    echo "MEMPOWER_DEBIAN_KERNEL=$out/vmlinuz"
    echo "MEMPOWER_DEBIAN_INITRD=$out/initrd.img"
    echo "MEMPOWER_DEBIAN_ROOTFS=$out/rootfs.ext4"
}

case "${1:-all}" in
    kernel) build_kernel ;;
    qemu-kernel) build_kernel qemu ;;
    initramfs) build_initramfs ;;
    testhost) build_testhost ;;
    debian) build_debian ;;
    all) build_kernel; build_initramfs; build_testhost; build_debian ;;
    *) die "usage: images/build.sh [all|kernel|qemu-kernel|initramfs|testhost|debian]" ;;
esac

#!/usr/bin/env bash
# mmdebstrap --customize-hook for mempower's Debian guest (images/build.sh debian).
# Runs on the build machine with the new root file system as $1, after the packages
# are installed. Environment (set by build.sh):
#   AGENT    the static guest-agent binary
#   UNIT     guest-agent/mempower-agent.service
#   KDEB     Debian's kernel package, extracted (boot/, lib/modules/)
#   KVER     its release, e.g. 6.1.0-57-amd64
set -euo pipefail
root=$1
: "${AGENT:?}" "${UNIT:?}" "${KDEB:?}" "${KVER:?}"

# The agent, as a service that starts early and restarts if it dies.
install -m 0755 "$AGENT" "$root/usr/local/sbin/mempower-agent"
install -m 0644 "$UNIT" "$root/etc/systemd/system/mempower-agent.service"
echo vmw_vsock_virtio_transport > "$root/etc/modules-load.d/mempower.conf"
# A test image: the agent serves the test-only requests (fill, pin, poke), which the
# unit alone refuses. ExecStart= empties the unit's list before the new command.
mkdir -p "$root/etc/systemd/system/mempower-agent.service.d"
printf '[Service]\nExecStart=\nExecStart=/usr/local/sbin/mempower-agent --daemon --test-requests\n' \
    > "$root/etc/systemd/system/mempower-agent.service.d/test-requests.conf"

# The kernel modules mempower's devices need, and what they depend on: not the whole
# 400 MB tree (the kernel itself stays outside the image: the VMM loads it).
mods=$KDEB/lib/modules/$KVER
dst=$root/lib/modules/$KVER
mkdir -p "$dst/kernel"
cp "$mods"/modules.builtin "$mods"/modules.builtin.modinfo "$mods"/modules.order "$dst/"
for d in drivers/virtio drivers/block/virtio_blk.ko net/vmw_vsock fs/ext4 fs/jbd2 fs/mbcache.ko \
         lib crypto arch/x86/crypto; do
    [ -e "$mods/kernel/$d" ] || { echo "debian-customize: $d missing in $KDEB" >&2; exit 1; }
    mkdir -p "$dst/kernel/$(dirname "$d")"
    cp -a "$mods/kernel/$d" "$dst/kernel/$d"
done
install -m 0644 "$KDEB/boot/config-$KVER" "$root/boot/config-$KVER"
chroot "$root" depmod -a "$KVER"

# The initrd: only the listed modules, loaded in this order at boot. virtio_mmio finds
# the devices through ACPI (LNRO0005); Debian's kernel has no virtio-mmio command line.
cat > "$root/etc/initramfs-tools/modules" <<'EOF'
virtio_mmio
virtio_blk
crc32c_generic
ext4
virtio_mem
vmw_vsock_virtio_transport
EOF
sed -i 's/^MODULES=.*/MODULES=list/; s/^#\?COMPRESS=.*/COMPRESS=gzip/' \
    "$root/etc/initramfs-tools/initramfs.conf"
chroot "$root" update-initramfs -c -k "$KVER" >&2

# Root on the first virtio-blk disk, no fsck (the image is rebuilt, not repaired).
echo '/dev/vda / ext4 rw,errors=remount-ro 0 0' > "$root/etc/fstab"
echo mempower-guest > "$root/etc/hostname"
# A test image: root logs in on the serial console without a password.
chroot "$root" passwd -d root >/dev/null
chroot "$root" systemctl enable mempower-agent.service serial-getty@ttyS0.service >&2
# Nothing that would slow a boot under emulation or write in the background.
chroot "$root" systemctl mask getty@tty1.service getty-static.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service systemd-timesyncd.service >&2 2>/dev/null || true
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/mempower.conf"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*

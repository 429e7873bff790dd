#!/usr/bin/env bash
# Builds a small Debian guest for twinvm from Debian's own packages:
#
#   <out>/vmlinuz            the kernel (a bzImage) from linux-image-*-<flavour>
#   <out>/initramfs.cpio.gz  busybox-static, the kernel's virtio modules and an
#                            /init that brings the guest up to a console shell
#   <out>/README             what was built, from which package versions
#
# Usage: scripts/build-linux-guest.sh [OUTPUT_DIR]
#
# Environment:
#   TWINVM_GUEST_OUT      output directory (default: build/linux-guest under the
#                         repository root); the argument wins over this
#   TWINVM_GUEST_FLAVOUR  Debian kernel flavour (default: cloud-amd64; the
#                         metapackage linux-image-<flavour> picks the version)
#   TWINVM_GUEST_FORCE=1  rebuild even if the output is up to date
#
# Only `apt-get download` is used for the guest's packages; nothing is installed
# on the host except the tools the script itself needs when they are missing
# (cpio, and xz/zstd if the kernel ships compressed modules).
set -euo pipefail

# The kernel modules the guest loads at boot, by module name. Their
# dependencies are found in the modules themselves and loaded first.
# This is the one list to edit.
GUEST_MODULES=(virtio virtio_ring virtio_mmio virtio_net virtio_blk)

BANNER='TWINVM LINUX GUEST READY'

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
out_dir=${1:-${TWINVM_GUEST_OUT:-$repo_root/build/linux-guest}}
flavour=${TWINVM_GUEST_FLAVOUR:-cloud-amd64}
force=${TWINVM_GUEST_FORCE:-0}

log() { printf '%s\n' "build-linux-guest: $*" >&2; }
die() {
    printf '%s\n' "build-linux-guest: error: $*" >&2
    exit 1
}

# Runs a command as root (directly, or through sudo when available).
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$*' needs root and sudo is not available; run it yourself and retry"
    fi
}

apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        log "refreshing the package lists (apt-get update)"
        as_root apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
}

# Makes sure a host tool exists, installing its Debian package only if absent.
need_tool() {
    local tool=$1 package=$2
    command -v "$tool" >/dev/null 2>&1 && return 0
    log "'$tool' is missing; installing the '$package' package"
    if ! as_root apt-get install -y -qq --no-install-recommends "$package" >/dev/null; then
        apt_update_once
        as_root apt-get install -y -qq --no-install-recommends "$package" >/dev/null ||
            die "could not install '$package' (needed for '$tool')"
    fi
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' still missing after installing '$package'"
}

# The candidate version of a package, or nothing if apt does not know it.
candidate_version() {
    apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1
}

# Prints the versioned kernel package the metapackage currently depends on.
resolve_kernel_package() {
    local meta=$1
    apt-cache depends --important "$meta" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ ]*\).*/\1/p' |
        grep -v -- '-unsigned$' | head -n 1
}

# ---------------------------------------------------------------- checks ----

for tool in apt-get apt-cache dpkg dpkg-deb sed find sort gzip od; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required (this script needs a Debian-based host)"
done
host_arch=$(dpkg --print-architecture)
[[ $host_arch == amd64 ]] || die "the guest is amd64 and this host is $host_arch; run the script on an amd64 Debian host"

meta="linux-image-$flavour"
if [[ -z $(candidate_version "$meta") ]]; then
    apt_update_once
    [[ -n $(candidate_version "$meta") ]] || die "apt knows no package '$meta' (is a Debian archive in sources.list?)"
fi
kernel_pkg=$(resolve_kernel_package "$meta")
[[ -n $kernel_pkg ]] || die "could not find the kernel package that '$meta' depends on"
kernel_ver=$(candidate_version "$kernel_pkg")
[[ -n $kernel_ver ]] || {
    apt_update_once
    kernel_ver=$(candidate_version "$kernel_pkg")
}
[[ -n $kernel_ver ]] || die "apt knows no version of '$kernel_pkg'"

busybox_pkg=busybox-static
busybox_ver=$(candidate_version "$busybox_pkg")
if [[ -z $busybox_ver ]]; then
    apt_update_once
    busybox_ver=$(candidate_version "$busybox_pkg")
    [[ -n $busybox_ver ]] || die "apt knows no package '$busybox_pkg'"
fi

script_sum=$(sha256sum "${BASH_SOURCE[0]}" | cut -d ' ' -f 1)
stamp="kernel=$kernel_pkg $kernel_ver busybox=$busybox_pkg $busybox_ver script=$script_sum"

if [[ $force != 1 && -f $out_dir/vmlinuz && -f $out_dir/initramfs.cpio.gz && -f $out_dir/README ]] &&
    grep -qxF "stamp: $stamp" "$out_dir/README"; then
    log "up to date ($kernel_pkg $kernel_ver, $busybox_pkg $busybox_ver); TWINVM_GUEST_FORCE=1 rebuilds"
    log "output: $out_dir"
    exit 0
fi

need_tool cpio cpio

# ------------------------------------------------------------- download ----

work=$(mktemp -d "${TMPDIR:-/tmp}/twinvm-linux-guest.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

log "downloading $kernel_pkg ($kernel_ver) and $busybox_pkg ($busybox_ver)"
download() {
    (cd "$work" && apt-get download -qq "$@" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    local p
    for p in "$@"; do
        compgen -G "$work/${p%%=*}_*.deb" >/dev/null || return 1
    done
}
if ! download "$kernel_pkg=$kernel_ver" "$busybox_pkg=$busybox_ver"; then
    # A stale package list points at files the mirror no longer has.
    apt_update_once
    download "$kernel_pkg=$kernel_ver" "$busybox_pkg=$busybox_ver" ||
        die "apt-get download of $kernel_pkg and $busybox_pkg failed"
fi

dpkg-deb -x "$work/${kernel_pkg}"_*.deb "$work/kernel"
dpkg-deb -x "$work/${busybox_pkg}"_*.deb "$work/busybox"

# --------------------------------------------------------------- kernel ----

kernel_image=$(find "$work/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
[[ -n $kernel_image ]] || die "$kernel_pkg contains no /boot/vmlinuz-*"
kver=${kernel_image##*/vmlinuz-}

# Debian moved /lib to /usr/lib (merged /usr); accept both layouts.
moddir=""
for d in "$work/kernel/lib/modules/$kver" "$work/kernel/usr/lib/modules/$kver"; do
    [[ -d $d ]] && moddir=$d
done
[[ -n $moddir ]] || die "$kernel_pkg contains no modules directory for $kver"

# A bzImage carries the "HdrS" setup header signature at offset 0x202.
hdr_magic=$(od -An -c -j 0x202 -N 4 "$kernel_image" | tr -d ' ')
[[ $hdr_magic == HdrS ]] || die "$kernel_image is not a bzImage (no HdrS at 0x202)"
proto_hex=$(od -An -tx2 -j 0x206 -N 2 "$kernel_image" | tr -d ' ')
boot_proto="$((16#${proto_hex:0:2})).$((16#${proto_hex:2:2}))"

# ------------------------------------------------------------- modules ----

declare -A mod_path=() # module name -> path of its file, relative to $moddir
while IFS= read -r f; do
    rel=${f#"$moddir"/}
    base=${rel##*/}
    name=${base%%.ko*}
    mod_path[${name//-/_}]=$rel
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

declare -A builtin=()
if [[ -f $moddir/modules.builtin ]]; then
    while IFS= read -r rel; do
        base=${rel##*/}
        name=${base%%.ko*}
        builtin[${name//-/_}]=1
    done <"$moddir/modules.builtin"
fi

# Decompresses (if needed) a module into the staging tree as a plain .ko, so
# that busybox insmod loads it whatever compression the kernel package uses.
stage_module() {
    local rel=$1 dest
    dest="$stage/lib/modules/$kver/${rel%.ko*}.ko"
    mkdir -p "${dest%/*}"
    case $rel in
    *.ko) cp "$moddir/$rel" "$dest" ;;
    *.ko.xz)
        need_tool xz xz-utils
        xz -dc "$moddir/$rel" >"$dest"
        ;;
    *.ko.zst)
        need_tool zstd zstd
        zstd -qdc "$moddir/$rel" >"$dest"
        ;;
    *.ko.gz) gzip -dc "$moddir/$rel" >"$dest" ;;
    *) die "unexpected module file $rel" ;;
    esac
    printf '%s\n' "${rel%.ko*}.ko"
}

# The "depends=" field of a staged module's .modinfo section.
module_depends() {
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
}

stage="$work/initramfs"
mkdir -p "$stage"

declare -A visited=()
load_order=()  # module file paths relative to /lib/modules/<kver>, deps first
load_names=()
skipped_builtin=()
add_module() {
    local name=${1//-/_} rel staged dep
    [[ -n ${visited[$name]:-} ]] && return 0
    visited[$name]=1
    if [[ -z ${mod_path[$name]:-} ]]; then
        if [[ -n ${builtin[$name]:-} ]]; then
            skipped_builtin+=("$name")
            return 0
        fi
        die "kernel $kver has no module '$name' (neither a .ko nor built in)"
    fi
    rel=${mod_path[$name]}
    staged=$(stage_module "$rel")
    for dep in $(module_depends "$stage/lib/modules/$kver/$staged"); do
        add_module "$dep"
    done
    load_order+=("$staged")
    load_names+=("$name")
}
for m in "${GUEST_MODULES[@]}"; do
    add_module "$m"
done

printf '%s\n' "${load_order[@]}" >"$stage/lib/modules/$kver/twinvm-load-order"
if [[ -f $moddir/modules.builtin ]]; then
    cp "$moddir/modules.builtin" "$stage/lib/modules/$kver/"
fi
# modules.dep etc. for interactive modprobe in the guest (busybox's own depmod).
"$work/busybox/bin/busybox" depmod -b "$stage" "$kver" ||
    log "warning: busybox depmod failed; modprobe in the guest will not work (insmod does)"

# ------------------------------------------------------------ initramfs ----

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
cp "$work/busybox/bin/busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"

cat >"$stage/init" <<EOF
#!/bin/busybox sh
# twinvm Debian guest init (generated by scripts/build-linux-guest.sh).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1

read -r cmdline </proc/cmdline
set -f

# Modules in dependency order, each with its options from the kernel command
# line (module.option=value), as modprobe would pass them.
kver=\$(uname -r)
while read -r ko; do
    [ -n "\$ko" ] || continue
    name=\${ko##*/}
    name=\${name%.ko}
    opts=""
    for word in \$cmdline; do
        case "\$word" in
        "\$name".*=*) opts="\$opts \${word#"\$name".}" ;;
        esac
    done
    # shellcheck disable=SC2086 # one argument per option
    insmod "/lib/modules/\$kver/\$ko" \$opts || echo "twinvm-init: could not load \$ko"
done <"/lib/modules/\$kver/twinvm-load-order"

# twinvm.ip=ADDR/PREFIX (and optionally twinvm.gw=ADDR) configure eth0.
ip=""
gw=""
for word in \$cmdline; do
    case "\$word" in
    twinvm.ip=*) ip="\${word#twinvm.ip=}" ;;
    twinvm.gw=*) gw="\${word#twinvm.gw=}" ;;
    esac
done
set +f

ip link set lo up 2>/dev/null
if [ -n "\$ip" ] && [ -e /sys/class/net/eth0 ]; then
    ip addr add "\$ip" dev eth0 && ip link set eth0 up &&
        echo "twinvm-init: eth0 \$ip"
    if [ -n "\$gw" ]; then
        ip route add default via "\$gw" dev eth0 || echo "twinvm-init: no default route via \$gw"
    fi
fi

echo "$BANNER"

# A shell on the console; when it exits the VM ends (twinvm boots Linux with
# reboot=k, so a reboot resets through the i8042 and twinvm exits with 0).
setsid cttyhack sh -l
echo "twinvm-init: shell exited, rebooting"
sync
reboot -f
EOF
chmod 755 "$stage/init"

cat >"$stage/etc/profile" <<'EOF'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
PS1='guest# '
EOF

# Fixed owners, times and order so that the same inputs give the same archive.
cpio_flags=(-o -H newc --owner=0:0 --quiet)
if cpio --help 2>&1 | grep -q -- --reproducible; then
    cpio_flags+=(--reproducible)
fi
find "$stage" -exec touch -h -d @0 {} +
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort | cpio "${cpio_flags[@]}") |
    gzip -9 -n >"$work/initramfs.cpio.gz"

listing=$(gzip -dc "$work/initramfs.cpio.gz" | cpio -t --quiet)
for want in init bin/busybox "${load_order[@]/#/lib/modules/$kver/}"; do
    grep -qxF "$want" <<<"$listing" || die "initramfs is missing $want"
done

# --------------------------------------------------------------- output ----

mkdir -p "$out_dir"
cp "$kernel_image" "$out_dir/vmlinuz.tmp"
mv "$work/initramfs.cpio.gz" "$out_dir/initramfs.cpio.gz.tmp"
{
    echo "twinvm Debian guest, built by scripts/build-linux-guest.sh"
    echo
    echo "kernel: $kernel_pkg $kernel_ver (Linux $kver, boot protocol $boot_proto)"
    echo "busybox: $busybox_pkg $busybox_ver"
    echo "modules (load order): ${load_names[*]}"
    if [[ ${#skipped_builtin[@]} -gt 0 ]]; then
        echo "built into the kernel: ${skipped_builtin[*]}"
    fi
    echo "banner: $BANNER"
    echo
    echo "Boot: twinvm run --kernel $out_dir/vmlinuz --initrd $out_dir/initramfs.cpio.gz --memory 512M"
    echo "Kernel command line: twinvm.ip=ADDR/PREFIX [twinvm.gw=ADDR] configure eth0;"
    echo "MODULE.OPTION=VALUE words are passed to that module when it is loaded."
    echo
    echo "stamp: $stamp"
} >"$out_dir/README.tmp"
mv "$out_dir/vmlinuz.tmp" "$out_dir/vmlinuz"
mv "$out_dir/initramfs.cpio.gz.tmp" "$out_dir/initramfs.cpio.gz"
mv "$out_dir/README.tmp" "$out_dir/README"

log "kernel:    $kernel_pkg $kernel_ver (Linux $kver, bzImage, boot protocol $boot_proto)"
log "busybox:   $busybox_pkg $busybox_ver"
log "modules:   ${load_names[*]}"
log "output:    $out_dir"
log "  vmlinuz            $(stat -c %s "$out_dir/vmlinuz") bytes"
log "  initramfs.cpio.gz  $(stat -c %s "$out_dir/initramfs.cpio.gz") bytes"

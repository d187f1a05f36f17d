#!/usr/bin/env bash
# Builds the release files of keepfix for old Linux servers (glibc 2.17 and newer: CentOS 7,
# RHEL 7/8/9, Ubuntu 20.04, ...), for x86_64 and aarch64:
#
#   scripts/release.sh          # -> target/dist/keepfix-VERSION-x86_64-linux-glibc2.17.tar.gz
#                               #    target/dist/keepfix-VERSION-aarch64-linux-glibc2.17.tar.gz
#   scripts/release.sh --deb    # plus keepfix_VERSION-1_amd64.deb and keepfix_VERSION-1_arm64.deb (cargo-deb)
#   scripts/release.sh --rpm    # plus keepfix-VERSION-1.x86_64.rpm and keepfix-VERSION-1.aarch64.rpm
#                               #    (cargo-generate-rpm), checked with rpm -qpR and rpm -qpl
#
# A plain `cargo build` here links symbols versioned GLIBC_2.33/2.34, which do not load on those
# systems. This script links against glibc 2.17 instead, with `cargo zigbuild --target
# x86_64-unknown-linux-gnu.2.17` (and aarch64-unknown-linux-gnu.2.17: zig as the linker, with its
# glibc 2.17 stubs; aarch64 glibc starts at 2.17), then checks, for each architecture, with
# scripts/check-glibc.sh (objdump) that neither file needs a GLIBC_ version above 2.17, that the
# library exports only its hooks, and that the staged files work here: preloaded the library
# gives a listening socket SO_KEEPALIVE=1 and its constructor runs (it rejects KEEPFIX_IDLE=abc),
# and `bin/keepfix check` finds lib/keepfix/libkeepfix.so. x86_64 runs natively (under python3);
# aarch64 runs under qemu-user (qemu-aarch64-static -L /usr/aarch64-linux-gnu), with a small C
# probe that zig compiles for aarch64 glibc 2.17. Any failure stops it with a non-zero exit and
# the reason. The packages are made from the files verified above, never from a new build.
#
# It installs what it lacks, without touching the system python: ziglang and cargo-zigbuild from
# PyPI into a venv at target/release-tools/venv (python3-venv and binutils with apt-get if missing,
# as root); the rustup targets; for aarch64, qemu-user-static and libc6-arm64-cross (the aarch64
# glibc that qemu runs the smoke test on) with apt-get; with --deb, cargo-deb, and with --rpm,
# cargo-generate-rpm, with `cargo install`, and rpm with apt-get. Running it again reuses all of
# that and rebuilds only what changed. Builds go to target/zigbuild/, so they never disturb
# target/release/.
#
# Tarball layout (what `keepfix run` looks for: dirname(exe)/../lib/keepfix/libkeepfix.so):
#   keepfix-VERSION-ARCH-linux-glibc2.17/bin/keepfix
#   keepfix-VERSION-ARCH-linux-glibc2.17/lib/keepfix/libkeepfix.so
#   keepfix-VERSION-ARCH-linux-glibc2.17/README.md, LICENSE* (if any), examples/ (if any)
#
# Environment: KEEPFIX_ZIGLANG and KEEPFIX_CARGO_ZIGBUILD override the pinned PyPI requirements,
# KEEPFIX_GLIBC the target glibc version (2.17), KEEPFIX_ARCHES the architectures ("x86_64
# aarch64").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }

want_deb=false
want_rpm=false
for arg in "$@"; do
    case "$arg" in
        --deb) want_deb=true ;;
        --rpm) want_rpm=true ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

glibc=${KEEPFIX_GLIBC:-2.17}
arches=${KEEPFIX_ARCHES:-x86_64 aarch64}
for arch in $arches; do
    case "$arch" in
        x86_64 | aarch64) ;;
        *) echo "KEEPFIX_ARCHES: unknown architecture '$arch' (x86_64, aarch64)" >&2; exit 2 ;;
    esac
done
# The aarch64 smoke test runs under qemu-user, on Debian's aarch64 glibc (libc6-arm64-cross).
qemu=qemu-aarch64-static
sysroot=/usr/aarch64-linux-gnu
# Versions this script was tested with; a new zig can change what the link pulls in.
ziglang_req=${KEEPFIX_ZIGLANG:-ziglang==0.17.1}
zigbuild_req=${KEEPFIX_CARGO_ZIGBUILD:-cargo-zigbuild==0.24.1}
tools=$root/target/release-tools
venv=$tools/venv
export CARGO_TARGET_DIR=$root/target/zigbuild
dist=$root/target/dist

step() { printf '\n==> %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }
die() { printf '\nrelease.sh: error: %s\n' "$*" >&2; exit 1; }
# apt_install PACKAGE...: only as root on a Debian/Ubuntu system; otherwise say what is missing.
apt_install() {
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        run apt-get update -qq
        DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq "$@" >/dev/null
    else
        die "missing: $* (install them, then run this again)"
    fi
}

step "tools"
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
if ! command -v objdump >/dev/null || ! command -v nm >/dev/null; then apt_install binutils; fi
for arch in $arches; do
    triple=$arch-unknown-linux-gnu
    if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
        run rustup target add "$triple"
    fi
done
if [[ " $arches " == *" aarch64 "* ]]; then
    aarch64_missing=()
    command -v "$qemu" >/dev/null || aarch64_missing+=(qemu-user-static)
    [ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] || aarch64_missing+=(libc6-arm64-cross)
    if [ ${#aarch64_missing[@]} -gt 0 ]; then apt_install "${aarch64_missing[@]}"; fi
    echo "qemu: $("$qemu" --version | head -n 1)"
fi
echo "rust: $(rustc --version)"

# The venv is (re)made when missing, broken, or made for other pinned versions.
stamp=$venv/.keepfix-requirements
if [ -x "$venv/bin/cargo-zigbuild" ] && [ -x "$venv/bin/python3" ] &&
    [ "$(cat "$stamp" 2>/dev/null)" = "$ziglang_req $zigbuild_req" ] &&
    "$venv/bin/python3" -m ziglang version >/dev/null 2>&1; then
    echo "reusing $venv ($ziglang_req $zigbuild_req)"
else
    command -v python3 >/dev/null || apt_install python3 python3-venv
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 has no ensurepip without python3-venv.
        rm -rf "$venv"
        py=$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
        apt_install python3-venv "$py-venv"
        run python3 -m venv "$venv"
    else
        echo "+ python3 -m venv $venv"
    fi
    run "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "$ziglang_req" "$zigbuild_req"
    echo "$ziglang_req $zigbuild_req" >"$stamp"
fi
# cargo-zigbuild finds zig as `python3 -m ziglang` through this PATH.
export PATH=$venv/bin:$PATH
echo "zig: $(python3 -m ziglang version), $(cargo-zigbuild --version)"

if $want_deb; then
    if command -v cargo-deb >/dev/null; then
        echo "cargo-deb: $(cargo deb --version 2>/dev/null || echo present)"
    else
        run cargo install --locked cargo-deb
    fi
fi
if $want_rpm; then
    if command -v cargo-generate-rpm >/dev/null; then
        echo "cargo-generate-rpm: $(cargo generate-rpm --version 2>/dev/null || echo present)"
    else
        run cargo install --locked cargo-generate-rpm
    fi
    command -v rpm >/dev/null || apt_install rpm
fi

version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "keepfix"))')

# The hooks libkeepfix.so exports, and nothing else (tests/edges.rs has the same list).
hooks="__libc_start_main __read_chk __recv_chk __recvfrom_chk accept accept4 capset close close_range closefrom connect dup dup2 dup3 fclose fcntl fcntl64 fork initgroups listen prctl prlimit prlimit64 pselect read readv recv recvfrom recvmsg select setegid seteuid setgid setgroups setns setregid setresgid setresuid setreuid setrlimit setrlimit64 setsockopt setuid socket syscall unshare vfork"
hooks=$(tr ' ' '\n' <<<"$hooks" | LC_ALL=C sort | paste -sd ' ' -)
# Reproducible archives: sorted names, root-owned, files dated from the last commit.
mtime=$(git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)
made=()

# The aarch64 smoke-test program: a listening socket, and its SO_KEEPALIVE on stdout (what the
# python3 one-liner does on x86_64). zig compiles it for aarch64 glibc $glibc, so no cross gcc is
# needed.
aarch64_probe=$tools/keepalive-probe-aarch64
make_aarch64_probe() {
    local src=$tools/keepalive-probe.c
    cat >"$src" <<'PROBE'
#include <stdio.h>
#include <sys/socket.h>
int main(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0), v = -1;
    socklen_t len = sizeof v;
    if (s < 0 || listen(s, 1) < 0 || getsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &v, &len) < 0) {
        perror("keepalive-probe");
        return 1;
    }
    printf("%d\n", v);
    return 0;
}
PROBE
    run python3 -m ziglang cc -target "aarch64-linux-gnu.$glibc" -O2 -o "$aarch64_probe" "$src"
}

# release ARCH: build, verify, package and smoke-test one architecture.
release() {
    local arch=$1
    local triple=$arch-unknown-linux-gnu
    local out=$CARGO_TARGET_DIR/$triple/release
    local name=keepfix-$version-$arch-linux-glibc$glibc
    # How this machine runs the architecture's programs, and the smoke test's program.
    local runner=() probe_cmd=()
    if [ "$arch" = x86_64 ]; then
        # A real executable, not a shell wrapper (pyenv's shims would run the preload in every process).
        local py
        py=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')
        probe_cmd=("$py" -c 'import socket; s = socket.socket(); s.listen(1); print(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))')
    else
        # qemu-user hands its environment (LD_PRELOAD, KEEPFIX_*) to the aarch64 program.
        runner=("$qemu" -L "$sysroot")
        probe_cmd=("${runner[@]}" "$aarch64_probe")
    fi

    step "$arch: build keepfix $version for glibc $glibc (cargo zigbuild, into ${CARGO_TARGET_DIR#"$root"/})"
    run cargo zigbuild --release --locked --target "$triple.$glibc" --bin keepfix --lib
    for f in "$out/keepfix" "$out/libkeepfix.so"; do
        [ -f "$f" ] || die "the build did not produce $f"
    done
    local want_machine=${arch/x86_64/X86-64}
    want_machine=${want_machine/aarch64/AArch64}
    for f in "$out/keepfix" "$out/libkeepfix.so"; do
        LC_ALL=C readelf -h "$f" | grep -q "Machine:.*$want_machine" || die "$f is not an $arch ELF file"
    done

    step "$arch: verify: no GLIBC_ version above $glibc"
    run scripts/check-glibc.sh --max "$glibc" "$out/keepfix" "$out/libkeepfix.so" ||
        die "the $arch build needs a glibc newer than $glibc (see the symbols above); it would not load on old servers"

    step "$arch: verify: libkeepfix.so exports only its hooks"
    local exported imported clash
    exported=$(nm -D --defined-only "$out/libkeepfix.so" | awk '{print $3}' | LC_ALL=C sort | paste -sd ' ' -)
    echo "exported: $exported"
    [ "$exported" = "$hooks" ] || die "$arch libkeepfix.so should export exactly: $hooks"
    # Hooks of functions glibc $glibc lacks (close_range, closefrom, fcntl64, ...) are resolved with
    # dlsym(RTLD_NEXT) at run time: the library must not import any of them from libc.
    imported=$(objdump -T "$out/libkeepfix.so" | awk '$4 == "*UND*" || $3 == "*UND*" {print $NF}' | LC_ALL=C sort)
    clash=$(LC_ALL=C comm -12 <(tr ' ' '\n' <<<"$hooks") <(echo "$imported") | paste -sd ' ' -)
    [ -z "$clash" ] || die "$arch libkeepfix.so imports functions it hooks: $clash"
    echo "imports none of the hooked functions"

    step "$arch: package $name.tar.gz"
    local stage=$dist/$name
    run rm -rf "$stage"
    run mkdir -p "$stage/bin" "$stage/lib/keepfix"
    run install -m 0755 "$out/keepfix" "$stage/bin/keepfix"
    run install -m 0755 "$out/libkeepfix.so" "$stage/lib/keepfix/libkeepfix.so"
    run install -m 0644 README.md "$stage/README.md"
    for license in LICENSE LICENSE-MIT LICENSE-APACHE LICENSE.md LICENSE.txt COPYING; do
        if [ -f "$license" ]; then run install -m 0644 "$license" "$stage/$license"; fi
    done
    if [ -d examples ]; then run cp -R examples "$stage/examples"; fi

    step "$arch: smoke test of the staged files (${runner[*]:-natively} on this machine's glibc)"
    local lib=$stage/lib/keepfix/libkeepfix.so got err check
    if [ "$arch" = aarch64 ]; then make_aarch64_probe; fi
    # 1. The library loads, and listen() gets keepalive.
    echo "+ LD_PRELOAD=$lib ${probe_cmd[*]}"
    got=$(env -i PATH="$PATH" LD_PRELOAD="$lib" "${probe_cmd[@]}" 2>/dev/null) ||
        die "$arch: the probe failed under the library"
    [ "$got" = 1 ] || die "$arch: SO_KEEPALIVE under the library is '$got', expected 1"
    echo "SO_KEEPALIVE=1 on a listening socket"
    # 2. Its .init_array constructor runs: it reads (and here rejects) the configuration.
    echo "+ KEEPFIX_IDLE=abc LD_PRELOAD=$lib ${probe_cmd[*]}"
    err=$(env -i PATH="$PATH" KEEPFIX_IDLE=abc LD_PRELOAD="$lib" "${probe_cmd[@]}" 2>&1 >/dev/null) || true
    grep -E '^keepfix\[[0-9]+\]: config KEEPFIX_IDLE="abc" is not a duration' <<<"$err" ||
        die "$arch: the constructor did not run: expected a 'config KEEPFIX_IDLE=\"abc\" is not a duration' line, got: $err"
    # 3. The command runs and finds the library through the tarball layout (bin/../lib/keepfix/).
    echo "+ ${runner[*]} $stage/bin/keepfix check"
    check=$(env -i PATH="$PATH" "${runner[@]}" "$stage/bin/keepfix" check 2>&1) || die "$arch: keepfix check failed: $check"
    grep -Fx "library: $lib" <<<"$check" || die "$arch: keepfix check did not find $lib: $check"
    env -i PATH="$PATH" "${runner[@]}" "$stage/bin/keepfix" --version

    local tarball=$dist/$name.tar.gz
    local tar_args=(--sort=name --owner=0 --group=0 --numeric-owner --mtime="$mtime" -C "$dist" -cf - "$name")
    echo "+ tar ${tar_args[*]} | gzip -n -9 > $tarball"
    tar "${tar_args[@]}" | gzip -n -9 >"$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    run rm -rf "$stage"
    tar -tzvf "$tarball"
    made+=("$tarball")

    if $want_deb; then
        step "$arch: package the .deb (cargo-deb, from the zigbuild outputs)"
        # [package.metadata.deb] names target/release/...; with --target, cargo-deb reads them from
        # $CARGO_TARGET_DIR/$triple/release/, the files verified above. --no-build: never rebuilds.
        run cargo deb --no-build --no-strip --target "$triple" --output "$dist/"
        local debarch=${arch/x86_64/amd64}
        debarch=${debarch/aarch64/arm64}
        local deb=$dist/keepfix_$version-1_$debarch.deb
        [ -f "$deb" ] || die "cargo deb did not make $deb"
        dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
        dpkg-deb --contents "$deb"
        made+=("$deb")
    fi

    if $want_rpm; then
        step "$arch: package the .rpm (cargo-generate-rpm, from the zigbuild outputs)"
        # [package.metadata.generate-rpm] names target/release/...; with --target (and
        # --target-dir), cargo-generate-rpm reads them from $CARGO_TARGET_DIR/$triple/release/,
        # the files verified above. It never builds. The payload is xz: the default, zstd, is
        # unreadable to RHEL 7's rpm 4.11. Requires from rpm's own find-requires (elfdeps reads
        # the ELF version needs of either architecture; the builtin mode runs ldd, which cannot
        # run an aarch64 file here).
        local rpmfile=$dist/keepfix-$version-1.$arch.rpm
        run cargo generate-rpm --target "$triple" --target-dir "$CARGO_TARGET_DIR" --arch "$arch" \
            --payload-compress xz --auto-req find-requires --source-date "$(date -d "$mtime" +%s)" --output "$rpmfile"
        [ -f "$rpmfile" ] || die "cargo generate-rpm did not make $rpmfile"
        check_rpm "$arch" "$rpmfile"
        made+=("$rpmfile")
    fi
}

# check_rpm ARCH FILE: the package is for ARCH, holds the files the systemd drop-in and `keepfix
# run` expect, and asks for nothing newer than glibc $glibc (rpm -qpR: the automatic
# libc.so.6(GLIBC_x.y)(64bit) requirements come from the same ELF version needs that
# check-glibc.sh verified).
check_rpm() {
    local arch=$1 file=$2 got reqs files f too_new
    got=$(rpm -qp --qf '%{NAME} %{VERSION}-%{RELEASE} %{ARCH}' "$file" 2>/dev/null)
    echo "$got"
    [ "$got" = "keepfix $version-1 $arch" ] || die "$file: expected 'keepfix $version-1 $arch', rpm says '$got'"
    echo "+ rpm -qpR $file"
    reqs=$(rpm -qpR "$file" 2>/dev/null) || die "rpm -qpR $file failed"
    echo "$reqs"
    too_new=$(grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' <<<"$reqs" | sed 's/^GLIBC_//' | sort -uV |
        while read -r v; do [ "$(printf '%s\n' "$v" "$glibc" | sort -V | tail -n 1)" = "$glibc" ] || echo "GLIBC_$v"; done)
    [ -z "$too_new" ] || die "$file requires $too_new, newer than glibc $glibc"
    ! grep -q 'PayloadIsZstd' <<<"$reqs" || die "$file has a zstd payload, which RHEL 7's rpm cannot read"
    # A plain "glibc >= X" requirement, if any, must allow $glibc too.
    while read -r v; do
        [ -z "$v" ] || [ "$(printf '%s\n' "$v" "$glibc" | sort -V | tail -n 1)" = "$glibc" ] ||
            die "$file requires glibc >= $v, newer than $glibc"
    done < <(sed -nE 's/^glibc >= ([0-9.]+).*/\1/p' <<<"$reqs")
    echo "+ rpm -qpl $file"
    files=$(rpm -qpl "$file" 2>/dev/null) || die "rpm -qpl $file failed"
    echo "$files"
    for f in /usr/bin/keepfix /usr/lib/keepfix/libkeepfix.so /usr/share/doc/keepfix/README.md \
        /usr/share/doc/keepfix/examples/systemd/keepfix.conf; do
        grep -Fxq "$f" <<<"$files" || die "$file does not install $f"
    done
    echo "requires nothing newer than glibc $glibc; installs the command, the library, the docs and the drop-in"
}

for arch in $arches; do
    release "$arch"
done

step "done"
ls -l "${made[@]}"
(cd "$dist" && for f in "${made[@]}"; do sha256sum "$(basename "$f")"; done)

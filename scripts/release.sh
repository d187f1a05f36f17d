#!/usr/bin/env bash
# Builds the release tarball of keepfix for old Linux servers (glibc 2.17 and newer: CentOS 7,
# RHEL 8, Ubuntu 20.04, ...):
#
#   scripts/release.sh          # -> target/dist/keepfix-VERSION-x86_64-linux-glibc2.17.tar.gz
#   scripts/release.sh --deb    # the same, plus target/dist/keepfix_VERSION-1_amd64.deb (cargo-deb)
#
# A plain `cargo build` here links symbols versioned GLIBC_2.33/2.34, which do not load on those
# systems. This script links against glibc 2.17 instead, with `cargo zigbuild --target
# x86_64-unknown-linux-gnu.2.17` (zig as the linker, with its glibc 2.17 stubs), then checks with
# scripts/check-glibc.sh (objdump) that neither file needs a GLIBC_ version above 2.17, that the
# library exports only its hooks, and that the staged files work here: preloaded under python3 the
# library gives a listening socket SO_KEEPALIVE=1 and its constructor runs (it rejects
# KEEPFIX_IDLE=abc), and `bin/keepfix check` finds lib/keepfix/libkeepfix.so. Any failure stops it
# with a non-zero exit and the reason.
#
# It installs what it lacks, without touching the system python: ziglang and cargo-zigbuild from
# PyPI into a venv at target/release-tools/venv (python3-venv and binutils with apt-get if missing,
# as root); with --deb, cargo-deb with `cargo install`. Running it again reuses all of that and
# rebuilds only what changed. Builds go to target/zigbuild/, so they never disturb target/release/.
#
# Tarball layout (what `keepfix run` looks for: dirname(exe)/../lib/keepfix/libkeepfix.so):
#   keepfix-VERSION-x86_64-linux-glibc2.17/bin/keepfix
#   keepfix-VERSION-x86_64-linux-glibc2.17/lib/keepfix/libkeepfix.so
#   keepfix-VERSION-x86_64-linux-glibc2.17/README.md, LICENSE* (if any), examples/ (if any)
#
# Environment: KEEPFIX_ZIGLANG and KEEPFIX_CARGO_ZIGBUILD override the pinned PyPI requirements,
# KEEPFIX_GLIBC the target glibc version (2.17).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }

want_deb=false
for arg in "$@"; do
    case "$arg" in
        --deb) want_deb=true ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

glibc=${KEEPFIX_GLIBC:-2.17}
triple=x86_64-unknown-linux-gnu
# Versions this script was tested with; a new zig can change what the link pulls in.
ziglang_req=${KEEPFIX_ZIGLANG:-ziglang==0.17.1}
zigbuild_req=${KEEPFIX_CARGO_ZIGBUILD:-cargo-zigbuild==0.24.1}
tools=$root/target/release-tools
venv=$tools/venv
export CARGO_TARGET_DIR=$root/target/zigbuild
out=$CARGO_TARGET_DIR/$triple/release
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
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
    run rustup target add "$triple"
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

version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "keepfix"))')
name=keepfix-$version-x86_64-linux-glibc$glibc

step "build keepfix $version for glibc $glibc (cargo zigbuild, into ${CARGO_TARGET_DIR#"$root"/})"
run cargo zigbuild --release --locked --target "$triple.$glibc" --bin keepfix --lib
for f in "$out/keepfix" "$out/libkeepfix.so"; do
    [ -f "$f" ] || die "the build did not produce $f"
done

step "verify: no GLIBC_ version above $glibc"
run scripts/check-glibc.sh --max "$glibc" "$out/keepfix" "$out/libkeepfix.so" ||
    die "the build needs a glibc newer than $glibc (see the symbols above); it would not load on old servers"

step "verify: libkeepfix.so exports only its hooks"
hooks="__libc_start_main __read_chk __recv_chk __recvfrom_chk accept accept4 capset close close_range closefrom connect dup dup2 dup3 fclose fcntl fcntl64 fork initgroups listen prctl prlimit prlimit64 pselect read readv recv recvfrom recvmsg select setegid seteuid setgid setgroups setns setregid setresgid setresuid setreuid setrlimit setrlimit64 setsockopt setuid socket syscall unshare vfork"
hooks=$(tr ' ' '\n' <<<"$hooks" | LC_ALL=C sort | paste -sd ' ' -)
exported=$(nm -D --defined-only "$out/libkeepfix.so" | awk '{print $3}' | LC_ALL=C sort | paste -sd ' ' -)
echo "exported: $exported"
[ "$exported" = "$hooks" ] || die "libkeepfix.so should export exactly: $hooks"
# Hooks of functions glibc $glibc lacks (close_range, closefrom, fcntl64, ...) are resolved with
# dlsym(RTLD_NEXT) at run time: the library must not import any of them from libc.
imported=$(objdump -T "$out/libkeepfix.so" | awk '$4 == "*UND*" || $3 == "*UND*" {print $NF}' | LC_ALL=C sort)
clash=$(LC_ALL=C comm -12 <(tr ' ' '\n' <<<"$hooks") <(echo "$imported") | paste -sd ' ' -)
[ -z "$clash" ] || die "libkeepfix.so imports functions it hooks: $clash"
echo "imports none of the hooked functions"

step "package $name.tar.gz"
stage=$dist/$name
run rm -rf "$stage"
run mkdir -p "$stage/bin" "$stage/lib/keepfix"
run install -m 0755 "$out/keepfix" "$stage/bin/keepfix"
run install -m 0755 "$out/libkeepfix.so" "$stage/lib/keepfix/libkeepfix.so"
run install -m 0644 README.md "$stage/README.md"
for license in LICENSE LICENSE-MIT LICENSE-APACHE LICENSE.md LICENSE.txt COPYING; do
    if [ -f "$license" ]; then run install -m 0644 "$license" "$stage/$license"; fi
done
if [ -d examples ]; then run cp -R examples "$stage/examples"; fi

step "smoke test of the staged files (on this machine's glibc)"
# A real executable, not a shell wrapper (pyenv's shims would run the preload in every process).
py=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')
lib=$stage/lib/keepfix/libkeepfix.so
probe='import socket; s = socket.socket(); s.listen(1); print(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))'
# 1. The library loads, and listen() gets keepalive.
echo "+ LD_PRELOAD=$lib $py -c '$probe'"
got=$(env -i PATH="$PATH" LD_PRELOAD="$lib" "$py" -c "$probe" 2>/dev/null) || die "python3 failed under the library"
[ "$got" = 1 ] || die "SO_KEEPALIVE under the library is '$got', expected 1"
echo "SO_KEEPALIVE=1 on a listening socket"
# 2. Its .init_array constructor runs: it reads (and here rejects) the configuration.
echo "+ KEEPFIX_IDLE=abc LD_PRELOAD=$lib $py -c pass"
err=$(env -i PATH="$PATH" KEEPFIX_IDLE=abc LD_PRELOAD="$lib" "$py" -c pass 2>&1 >/dev/null) || true
grep -E '^keepfix\[[0-9]+\]: config KEEPFIX_IDLE="abc" is not a duration' <<<"$err" ||
    die "the constructor did not run: expected a 'config KEEPFIX_IDLE=\"abc\" is not a duration' line, got: $err"
# 3. The command runs and finds the library through the tarball layout (bin/../lib/keepfix/).
echo "+ $stage/bin/keepfix check"
out=$(env -i PATH="$PATH" "$stage/bin/keepfix" check 2>&1) || die "keepfix check failed: $out"
grep -Fx "library: $lib" <<<"$out" || die "keepfix check did not find $lib: $out"
"$stage/bin/keepfix" --version
# Reproducible archive: sorted names, root-owned, files dated from the last commit.
mtime=$(git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)
tarball=$dist/$name.tar.gz
tar_args=(--sort=name --owner=0 --group=0 --numeric-owner --mtime="$mtime" -C "$dist" -cf - "$name")
echo "+ tar ${tar_args[*]} | gzip -n -9 > $tarball"
tar "${tar_args[@]}" | gzip -n -9 >"$tarball.tmp"
mv "$tarball.tmp" "$tarball"
run rm -rf "$stage"
tar -tzvf "$tarball"

if $want_deb; then
    step "package the .deb (cargo-deb, from the zigbuild outputs)"
    # [package.metadata.deb] names target/release/...; with --target, cargo-deb reads them from
    # $CARGO_TARGET_DIR/$triple/release/, the files verified above. --no-build: never rebuilds.
    run cargo deb --no-build --no-strip --target "$triple" --output "$dist/"
    deb=$dist/keepfix_$version-1_amd64.deb
    [ -f "$deb" ] || die "cargo deb did not make $deb"
    dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
    dpkg-deb --contents "$deb"
fi

step "done"
ls -l "$tarball" ${deb:+"$deb"}
(cd "$dist" && sha256sum "$(basename "$tarball")" ${deb:+"$(basename "$deb")"})

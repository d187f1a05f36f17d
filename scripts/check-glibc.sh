#!/usr/bin/env bash
# Verifies that ELF files load on an old glibc: none may need a GLIBC_ symbol version above a maximum.
#
#   scripts/check-glibc.sh FILE... [--max 2.17]
#
# For each FILE it prints the newest GLIBC_ version the file needs, from two sources that must agree:
#   - `objdump -T`: the versioned dynamic symbols it imports (the offending symbols are listed on failure);
#   - `objdump -p`: its "Version References", what the dynamic loader actually checks at load time
#     ("version `GLIBC_2.34' not found" on an older system).
# It also fails on an imported symbol that is neither versioned nor weak: a function the link found
# in no versioned library, as when zig's glibc stubs for the target version lack it (close_range on
# 2.17). Meant for files that link only glibc's libraries (libc, libpthread, libdl, libm, ld-linux).
# A GLIBC_PRIVATE reference also fails: it ties the file to one exact glibc build.
#
# Exit status: 0 if every FILE is within --max (default 2.17), 1 if any needs more, 2 on a usage error
# or a file objdump cannot read. Used by scripts/release.sh and by CI.
set -euo pipefail

usage() {
    echo "usage: $0 FILE... [--max VERSION]   (VERSION defaults to 2.17)" >&2
    exit 2
}

max=2.17
files=()
while [ $# -gt 0 ]; do
    case "$1" in
        --max) [ $# -ge 2 ] || usage; max="$2"; shift 2 ;;
        --max=*) max="${1#--max=}"; shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) files+=("$1"); shift ;;
    esac
done
[ ${#files[@]} -gt 0 ] || usage
[[ "$max" =~ ^[0-9]+(\.[0-9]+)*$ ]] || { echo "--max must be a version like 2.17, not '$max'" >&2; exit 2; }
command -v objdump >/dev/null || { echo "objdump not found: apt-get install binutils" >&2; exit 2; }

# newest VERSION... : the highest of its arguments, in version order (2.2.5 < 2.17 < 2.34).
newest() { printf '%s\n' "$@" | sort -V | tail -n 1; }
# above A B: whether version A is strictly newer than version B.
above() { [ "$1" != "$2" ] && [ "$(newest "$1" "$2")" = "$1" ]; }

status=0
for file in "${files[@]}"; do
    if [ ! -f "$file" ]; then
        echo "$file: no such file" >&2
        status=2
        continue
    fi
    if ! symbols=$(objdump -T "$file" 2>&1) || ! headers=$(objdump -p "$file" 2>&1); then
        echo "$file: objdump cannot read it:" >&2
        echo "$symbols" | head -n 3 >&2
        status=2
        continue
    fi

    # Versions named in the imported symbols, e.g. "(GLIBC_2.34) dlsym" or "GLIBC_2.2.5  malloc".
    mapfile -t symbol_versions < <(grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' <<<"$symbols" | sed 's/^GLIBC_//' | sort -uV)
    # Versions in the "Version References" of libc.so.6/libm/libpthread/libdl/... (the verneed table).
    mapfile -t needed_versions < <(sed -n '/^Version References:/,/^$/p' <<<"$headers" |
        grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' | sed 's/^GLIBC_//' | sort -uV)
    libs=$(awk '$1 == "NEEDED" {print $2}' <<<"$headers" | paste -sd ' ' -)
    # Imported symbols with no version at all. objdump -T prints "ADDR FLAGS *UND*<TAB>SIZE [VERSION] NAME".
    # Weak ones are looked up at run time and may be missing (Rust's std does that for gettid,
    # statx, getrandom, ...). A strong one is a function the link found in no versioned library,
    # e.g. one that zig's glibc stubs for the target version lack (close_range, closefrom on 2.17):
    # the file then fails to load (with -z now) or fails at the first call.
    unversioned_strong=$(awk -F'\t' '$1 ~ /[*]UND[*]/ && split($2, f, " ") < 3 && $1 !~ / w / {print f[2]}' <<<"$symbols" | sort -u | paste -sd ' ' -)
    unversioned_weak=$(awk -F'\t' '$1 ~ /[*]UND[*]/ && split($2, f, " ") < 3 && $1 ~ / w / {print f[2]}' <<<"$symbols" | sort -u | paste -sd ' ' -)

    all=("${symbol_versions[@]}" "${needed_versions[@]}")
    if [ ${#all[@]} -eq 0 ]; then
        highest=none
        line="$file: needs no GLIBC_ version [max $max]; needs: ${libs:-nothing}"
    else
        highest=$(newest "${all[@]}")
        line="$file: highest GLIBC_$highest (symbols: GLIBC_$(newest "${symbol_versions[@]:-0}"), version references: GLIBC_$(newest "${needed_versions[@]:-0}")) [max $max]; needs: ${libs:-nothing}"
    fi
    if [ -n "$unversioned_weak" ]; then
        line="$line; weak, looked up at run time: $unversioned_weak"
    fi

    private=$(grep -E 'GLIBC_PRIVATE' <<<"$symbols" || true)
    offending=()
    for v in "${all[@]}"; do
        if above "$v" "$max"; then offending+=("$v"); fi
    done

    if [ ${#offending[@]} -eq 0 ] && [ -z "$private" ] && [ -z "$unversioned_strong" ]; then
        echo "$line OK"
        continue
    fi
    status=1
    echo "$line FAILED" >&2
    for v in $(printf '%s\n' "${offending[@]}" | sort -uV); do
        echo "  needs GLIBC_$v, newer than $max; symbols:" >&2
        grep -F "GLIBC_$v" <<<"$symbols" | grep -E "\(?GLIBC_$v\)?[[:space:]]" | awk '{print "    " $NF}' | sort -u >&2 ||
            echo "    (no symbol: only the version reference table names it)" >&2
    done
    if [ -n "$unversioned_strong" ]; then
        echo "  imports symbols that no versioned library provides (missing from the glibc it was linked for?):" >&2
        tr ' ' '\n' <<<"$unversioned_strong" | sed 's/^/    /' >&2
    fi
    if [ -n "$private" ]; then
        echo "  needs GLIBC_PRIVATE, which binds it to one glibc build; symbols:" >&2
        awk '{print "    " $NF}' <<<"$private" | sort -u >&2
    fi
done

if [ $status -eq 1 ]; then
    echo "check-glibc: FAILED: the files above will not load on a glibc older than what they need" >&2
fi
exit $status

#!/usr/bin/env bash
# Offline checks of the systemd units; never starts systemd (it would take over the machine).
#  - systemd-analyze verify: syntax, unknown keys, bad values (it only *warns* on unknown
#    keys with rc 0, so any diagnostic naming our unit counts as a failure here)
#  - systemd-analyze security --offline: system unit exposure must be <= 2.0
# ExecStart is rewritten to an executable that exists here, since verify checks it.
set -euo pipefail

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-systemd: SKIPPED - systemd-analyze is not installed (apt-get install systemd)"
    exit 0
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
exe="$repo/.venv/bin/piker"
[[ -x "$exe" ]] || exe="$(command -v true)"
failed=0

verify() {  # verify <label> <unit file> [--user]
    local label="$1" unit="$2"; shift 2
    local out rc=0
    out="$(systemd-analyze "$@" verify "$unit" 2>&1)" || rc=$?
    if [[ $rc -ne 0 ]] || grep -q 'piker-bot' <<<"$out"; then
        echo "check-systemd: FAIL verify $label (rc=$rc)"
        echo "$out"
        failed=1
    else
        echo "check-systemd: ok   verify $label"
        [[ -z "$out" ]] || echo "$out"
    fi
}

# system unit
mkdir -p "$work/system"
sed "s#/opt/piker-bot/venv/bin/piker#$exe#" "$repo/systemd/piker-bot.service" \
    > "$work/system/piker-bot.service"
verify system "$work/system/piker-bot.service"
if out="$(systemd-analyze security --offline=true --threshold=20 \
        "$work/system/piker-bot.service" 2>&1)"; then
    echo "check-systemd: ok   security system ($(grep -o 'exposure level.*' <<<"$out"))"
else
    echo "check-systemd: FAIL security system (exposure must be <= 2.0)"
    echo "$out"
    failed=1
fi

# user unit (a user manager needs a private runtime dir to load units)
mkdir -p "$work/user" "$work/xdg-runtime"
chmod 0700 "$work/xdg-runtime"
sed "s#%h/.local/share/piker-bot/venv/bin/piker#$exe#" "$repo/systemd/piker-bot.user.service" \
    > "$work/user/piker-bot.service"
XDG_RUNTIME_DIR="$work/xdg-runtime" verify user "$work/user/piker-bot.service" --user

exit "$failed"

#!/usr/bin/env bash
# The unit under a real systemd: boot a Debian bookworm root with systemd as PID 1 in a
# systemd-nspawn container, install the release bundle with the installer (which then uses
# systemctl and its systemd health check), and check what the unit promises:
#   start and READY (Type=notify), STATUS text, the watchdog (a stopped process is killed and
#   restarted), a clean stop, no restart loop on an invalid config (exit 2), the hardening score.
#
#   sudo tools/systemd-check.sh [--root DIR]     # default /srv/sortgate-root-systemd
#
# Needs root, debootstrap and systemd-container (systemd-nspawn). The host need not run systemd:
# nspawn is started with --register=no --keep-unit. Not part of CI (it boots a root: ~3 minutes,
# the first debootstrap several more).
set -euo pipefail
cd "$(dirname "$0")/.."
root=/srv/sortgate-root-systemd
[[ "${1:-}" == "--root" ]] && root=$2
[[ $(id -u) -eq 0 ]] || { echo "$0: run as root" >&2; exit 2; }
if [[ ! -x $root/lib/systemd/systemd ]]; then
    debootstrap --arch amd64 --variant=minbase \
        --include=systemd,systemd-sysv,dbus,udev,python3,python3-venv,mosquitto,ca-certificates,passwd,procps \
        bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fi
echo sortgate-check > "$root/etc/hostname"
bundle=$(tools/bundle.sh --wheelhouse x86_64 | tail -1)  # offline: the root has no PyPI (nor the host's CA)
version=$(basename "$bundle" .tar.gz | cut -d- -f2)
rm -rf "$root/root/sortgate-"* && tar -xzf "$bundle" -C "$root/root"

systemd-nspawn -q -D "$root" --register=no --keep-unit -b > /tmp/sortgate-nspawn.log 2>&1 &
nspawn=$!
trap 'kill $nspawn 2>/dev/null || true; wait $nspawn 2>/dev/null || true' EXIT
leader=""
ct() { nsenter -t "$leader" -m -u -i -p -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
for _ in $(seq 60); do
    sleep 1
    leader=$(pgrep -P $nspawn -x systemd || true)
    [[ -n $leader ]] || continue
    [[ $(ct systemctl is-system-running 2>/dev/null || true) =~ ^(running|degraded)$ ]] && break
done
[[ -n $leader ]] || { echo "systemd did not boot"; cat /tmp/sortgate-nspawn.log; exit 1; }
ok=0 ; fail=0
check() { if "$@"; then echo "PASS: $label"; ok=$((ok+1)); else echo "FAIL: $label"; fail=$((fail+1)); fi; }
prop() { ct systemctl show -P "$1" sortgate.service; }

echo "== systemd $(ct systemctl --version | head -1 | cut -d' ' -f2) is PID 1 in the container"
ct rm -rf /opt/sortgate
echo "== install.py install (systemd health check: active and no restart for 10 s)"
label="install with the systemd health check"; check ct python3 "/root/sortgate-$version/install.py" install \
    --find-links "/root/sortgate-$version/wheels" --no-index
label="active after READY=1 (Type=notify)"; check test "$(ct systemctl is-active sortgate)" = active
echo "   StatusText: $(prop StatusText)"
label="STATUS= text names the controller"; check grep -q "controller" <<<"$(prop StatusText)"
label="runs as the sortgate user"; check test "$(ct ps -o user= -p "$(prop MainPID)")" = sortgate

pid=$(prop MainPID); restarts=$(prop NRestarts)
[[ $pid -gt 0 ]] || { echo "no main process: $(prop Result)"; ct journalctl -u sortgate --no-pager -n 40; exit 1; }
echo "== watchdog: SIGSTOP the agent (WatchdogSec=5)"
ct kill -STOP "$pid"
for _ in $(seq 20); do sleep 1; [[ $(prop MainPID) != "$pid" && $(prop MainPID) != 0 ]] && break; done
label="a frozen agent is killed and restarted by the watchdog"; check test "$(prop NRestarts)" -gt "$restarts"
for _ in $(seq 20); do [[ $(ct systemctl is-active sortgate) == active ]] && break; sleep 1; done
label="active again after the watchdog restart"; check test "$(ct systemctl is-active sortgate)" = active
ct journalctl -u sortgate --no-pager -n 200 | grep -i -m1 "watchdog" || true

echo "== clean stop"
ct systemctl stop sortgate
label="stopped with Result=success (SIGTERM handled, exit 0)"; check test "$(prop Result)" = success
ct journalctl -u sortgate --no-pager -n 50 | grep -m1 "sortgate stopping" || true

echo "== an invalid config: the agent exits 2 before it starts, and systemd does not loop"
ct cp /etc/sortgate/sortgate.toml /root/good.toml
ct sed -i 's/^poll_interval_ms = 5 /poll_interval_ms = 0 /' /etc/sortgate/sortgate.toml
ct systemctl reset-failed sortgate || true
ct systemctl start sortgate || true
sleep 4
label="failed, not restarting"; check test "$(ct systemctl is-active sortgate || true)" = failed
label="no restarts for exit 2"; check test "$(prop NRestarts)" = 0
ct journalctl -u sortgate --no-pager -n 20 | grep -m1 "poll_interval_ms" || true
ct cp /root/good.toml /etc/sortgate/sortgate.toml
ct systemctl reset-failed sortgate; ct systemctl start sortgate
sleep 3
label="starts again with the good config"; check test "$(ct systemctl is-active sortgate)" = active

echo "== hardening: systemd-analyze security"
ct systemd-analyze security sortgate.service --no-pager | tail -1
echo "== $ok passed, $fail failed"
ct systemctl stop sortgate
exit $((fail > 0))

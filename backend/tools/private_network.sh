#!/bin/sh
# Run a command in a private network namespace where only loopback is up, when this machine
# allows one (`unshare -rn`, as root or an unprivileged user); otherwise run it as it is.
# Ray listens on every interface and probes for a routable address, so whatever starts a Ray
# cluster (the `ray` tests, the worker benchmarks) runs here, where nothing else can reach it.
if command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
    && unshare -rn true 2>/dev/null; then
    exec unshare -rn sh -c 'ip link set lo up && exec "$0" "$@"' "$@"
fi
echo "note: no private network namespace here (unshare -rn is unavailable); Ray suites skip" >&2
exec "$@"

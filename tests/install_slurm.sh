#!/usr/bin/env bash
# What the Slurm tests (tests/test_slurm.py) need: Debian's munge, slurmctld, slurmd and slurm-client. Installs the
# missing ones when running as root with apt-get (CI, via tests/run.sh); otherwise says so and changes nothing, and
# those tests skip with the same hint. The daemons are not started here: tests/slurm.py starts its own for the session.
set -uo pipefail
missing=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
    bin="${pair%%:*}"
    command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || missing+=("${pair##*:}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] the Slurm tests will skip: ${missing[*]} not installed (as root: apt-get install ${missing[*]})" >&2
    exit 0
fi
echo "[setup] installing ${missing[*]} for the Slurm tests"
log="$(mktemp /tmp/megapack-slurm-install.XXXXXX)"
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1; }
if ! install && ! { apt-get update -q >>"$log" 2>&1 && install; }; then
    tail -n 20 "$log" >&2
    echo "[setup] could not install ${missing[*]} (log: $log); the Slurm tests will skip" >&2
fi
exit 0

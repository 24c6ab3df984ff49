#!/bin/sh
# Open MPI's rsh launcher for tests/mpi_netns.py (--mca plm_rsh_agent): where
# mpiexec would ssh to HOST, run the command in the network namespace that
# holds HOST's address instead, in a UTS namespace of its own so that the
# ranks there report a host name of their own.
#
# usage: netns_rsh.sh HOST COMMAND...
# COPROC_NETNS_HOSTS="ADDRESS=NETNS:HOSTNAME ..." (set by mpi_netns.py)
host=$1
shift
target=
for entry in $COPROC_NETNS_HOSTS; do
    case $entry in "$host="*) target=${entry#*=} ;; esac
done
if [ -z "$target" ]; then
    echo "netns_rsh.sh: no namespace for host '$host' in COPROC_NETNS_HOSTS" >&2
    exit 255 # what ssh returns when it cannot connect
fi
# Like ssh, hand the words to a shell as one command line: Open MPI quotes
# them for that.
exec ip netns exec "${target%%:*}" unshare --uts \
    sh -c 'hostname "$0" && eval "$1"' "${target#*:}" "$*"

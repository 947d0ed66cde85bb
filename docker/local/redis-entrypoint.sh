#!/bin/sh
# Like the official image: a redis-server started without a configuration file accepts other
# containers (protected mode is for a server bound to every address by accident).
set -eu
if [ "${1:-}" = redis-server ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"

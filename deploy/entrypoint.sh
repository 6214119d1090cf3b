#!/bin/sh
# exec, so docker stop's SIGTERM reaches ark-server/ark-client, which then stop their own
# process groups (SuperLink, SuperNode, app processes) before the container ends.
set -eu
if [ "$#" -eq 0 ]; then
  echo "usage: ark keys ... | ark-server FEDERATION_YAML | ark-client SITE_YAML" >&2
  exit 2
fi
exec "$@"

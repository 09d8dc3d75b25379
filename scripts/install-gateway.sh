#!/usr/bin/env bash
# Installs a gridweaver binary on a gateway as a systemd service.
#   sudo scripts/install-gateway.sh path/to/gridweaver [path/to/config.yaml]
# The config defaults to config/depot.yaml; edit /etc/gridweaver/gridweaver.yaml afterwards
# (its store.path should be under /var/lib/gridweaver).
set -euo pipefail
bin=${1:?usage: install-gateway.sh BINARY [CONFIG]}
conf=${2:-"$(dirname "$0")/../config/depot.yaml"}
here=$(dirname "$0")

"$bin" check-config "$conf"
id gridweaver >/dev/null 2>&1 || useradd --system --home /var/lib/gridweaver --shell /usr/sbin/nologin gridweaver
install -m 0755 "$bin" /usr/local/bin/gridweaver
install -d -m 0755 /etc/gridweaver
[ -e /etc/gridweaver/gridweaver.yaml ] || install -m 0640 -g gridweaver "$conf" /etc/gridweaver/gridweaver.yaml
install -d -m 0750 -o gridweaver -g gridweaver /var/lib/gridweaver
install -m 0644 "$here/gridweaver.service" /etc/systemd/system/gridweaver.service
systemctl daemon-reload
systemctl enable --now gridweaver
systemctl --no-pager status gridweaver || true

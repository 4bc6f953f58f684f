FTTP_AGENT_SETUP
fttp_agent_setup
# $1: 1 on install, 2 on upgrade (a running daemon is restarted).
if [ "$1" -ge 2 ] && [ -d /run/systemd/system ]; then
    systemctl try-restart fttp-agent-daemon.service || true
fi
if [ "$1" -eq 1 ]; then
    echo "fttp-agent: configure /etc/fttp-agent/config.toml, check it with"
    echo "  sudo -u fttp-agent fttp-agent check"
    echo "then enable one of: systemctl enable --now fttp-agent.timer (or fttp-agent-daemon.service)"
fi

# $1: 0 on removal (1 on upgrade): removal stops the units.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop fttp-agent.timer fttp-agent.service fttp-agent-daemon.service || true
    systemctl disable fttp-agent.timer fttp-agent.service fttp-agent-daemon.service >/dev/null 2>&1 || true
fi

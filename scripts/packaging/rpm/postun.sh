FTTP_AGENT_SETUP
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    fttp_agent_kept
fi

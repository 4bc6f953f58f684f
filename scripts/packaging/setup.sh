# Shared by the .deb's postinst and the .rpm's %post (sourced, POSIX sh):
# the user, the directories, the configuration's owner and mode, and the
# store key, made once and never replaced. Nothing is started: the admin
# configures /etc/fttp-agent/config.toml and enables a unit.

fttp_agent_setup() {
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers /usr/lib/sysusers.d/fttp-agent.conf
    elif ! getent passwd fttp-agent >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/fttp-agent --no-create-home \
            --shell /usr/sbin/nologin fttp-agent
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create /usr/lib/tmpfiles.d/fttp-agent.conf
    else
        install -d -m 0700 -o fttp-agent -g fttp-agent /var/lib/fttp-agent
        install -d -m 0750 -o fttp-agent -g fttp-agent /var/log/fttp-agent
    fi
    # The configuration can hold an API key inline: root writes it, the
    # agent reads it, nobody else does.
    chown root:fttp-agent /etc/fttp-agent /etc/fttp-agent/config.toml
    chmod 0750 /etc/fttp-agent
    chmod 0640 /etc/fttp-agent/config.toml
    # The store key: made once, never replaced (an upgrade keeps it).
    if [ ! -e /etc/fttp-agent/store.key ]; then
        /usr/bin/fttp-agent keygen /etc/fttp-agent/store.key >/dev/null
        chown fttp-agent:fttp-agent /etc/fttp-agent/store.key
        chmod 0600 /etc/fttp-agent/store.key
        echo "fttp-agent: created the store key /etc/fttp-agent/store.key; back it up apart from the store"
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
}

fttp_agent_kept() {
    echo "fttp-agent: kept the store /var/lib/fttp-agent, its key /etc/fttp-agent/store.key and the logs"
    echo "  /var/log/fttp-agent: without the store and its key the site's pseudonyms are lost."
    echo "  Delete them by hand only when the site has left every study."
}

//! One user owns the agent's files. An admin command run as root (`sudo
//! fttp-agent import ...`) would leave root-owned files in the store or
//! audit directory, and every later run as the service user would fail on
//! them: the agent refuses to write where another user owns the files, and
//! says how to run it as that user.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why this process may not write `path`: its owner is another user.
pub(crate) fn foreign_owner(path: &Path, what: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() == me {
        return None;
    }
    let owner = user_name(meta.uid()).unwrap_or_else(|| format!("uid {}", meta.uid()));
    let running = user_name(me).unwrap_or_else(|| format!("uid {me}"));
    Some(format!(
        "{what} {} belongs to user {owner}, but this command runs as {running}: files it wrote would belong to \
         {running}, and the agent, running as {owner}, could no longer write them. Run it as that user: \
         sudo -u {owner} fttp-agent ...",
        path.display()
    ))
}

/// The name of `uid` in /etc/passwd (no NSS: names from LDAP show as uids).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

//! Records the git commit the binary is built from, for `--version`
//! (`unknown` outside a git checkout, e.g. from a source tarball).

fn main() {
    // (A packager building from a tarball can say which commit it is.)
    let given = std::env::var("FTTP_AGENT_COMMIT").ok().filter(|s| !s.is_empty());
    let commit = given
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FTTP_AGENT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=FTTP_AGENT_COMMIT");
}

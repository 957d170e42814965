//! Helpers shared by the host agent's integration tests.

use std::path::Path;
use std::process::Command;

/// Make `root` a git working tree with everything in it committed, as a user's
/// checkout would be (udos takes the workspace layer from git's view of the tree).
pub fn commit_all(root: &Path) {
    for args in [
        &["init", "-q", "."][..],
        &["add", "-A"][..],
        &["commit", "-q", "-m", "test"][..],
    ] {
        let ok = Command::new("git")
            .args(args)
            .current_dir(root)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .status()
            .expect("run git")
            .success();
        assert!(ok, "git {args:?} in {}", root.display());
    }
}

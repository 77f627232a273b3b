//! Where PostgreSQL is installed (Debian's layout), for the tests and the pgbench benchmark.

use std::path::{Path, PathBuf};

/// The newest `/usr/lib/postgresql/*/bin` holding `initdb`, `pg_ctl` and `pgbench`, if any.
pub fn pg_bin() -> Option<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pgbench").exists())
        .collect();
    versions.sort();
    versions.pop()
}

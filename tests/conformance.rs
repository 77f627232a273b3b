//! POSIX conformance through a real mount: pjdfstest 0.2.2 (every group) and fsx 0.3.2 (random
//! reads, writes, truncates and mmap, checked byte for byte).
//!
//! Both tools come from crates.io; `.ci/run` builds them once into `~/.cache/keepfs-tools`
//! (or set `KEEPFS_PJDFSTEST` / `KEEPFS_FSX` to the binaries). pjdfstest needs root and the
//! `tests` user, and runs against moto or another AWS-like server (`KEEPFS_TEST_S3_ENDPOINT`):
//! s3s-fs refuses 255-byte names and can't hold empty directories, which pjdfstest's cases
//! need. Each prints `SKIPPED:` where it can't run.
//!
//! pjdfstest: every case that fails must be listed, with its reason, in
//! `tests/conformance/known-failures.txt` (docs/CONFORMANCE.md explains them), so a new
//! failure fails the test; the score is printed.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Mount, server};

/// A tool built by `.ci/run`: `$env`, else `~/.cache/keepfs-tools/bin/NAME`, else on PATH.
fn tool(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let cached = home.join(".cache/keepfs-tools/bin").join(name);
    if cached.exists() {
        return Some(cached);
    }
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// The cases expected to fail (first word of each non-comment line).
fn known_failures() -> BTreeSet<String> {
    std::fs::read_to_string(here().join("known-failures.txt"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// (passed, failed, skipped) case names from pjdfstest's output.
fn outcomes(output: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut ok, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for line in output.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(result)) = (words.next(), words.last()) else {
            continue;
        };
        if !name.contains("::") {
            continue;
        }
        match result {
            "ok" => ok.push(name.to_owned()),
            "FAILED" => failed.push(name.to_owned()),
            "skipped" => skipped.push(name.to_owned()),
            _ => {}
        }
    }
    (ok, failed, skipped)
}

#[test]
fn pjdfstest_passes_but_for_the_documented_cases() {
    let s = server();
    if s.kind == common::ServerKind::S3sFs {
        common::skipped(
            "pjdfstest: needs an AWS-like server (s3s-fs refuses 255-byte names); CI runs it on moto",
        );
        return;
    }
    let Some(pjdfstest) = tool("KEEPFS_PJDFSTEST", "pjdfstest") else {
        common::skipped("pjdfstest: not built (cargo install pjdfstest --version 0.2.2)");
        return;
    };
    let has_user = Command::new("id")
        .arg("tests")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_user {
        common::skipped("pjdfstest: needs the `tests` user (useradd -M -U tests)");
        return;
    }
    let bucket = s.bucket("pjdfstest");
    let m = Mount::new(&format!("s3://{bucket}"), &["--allow-other"]);
    let out = Command::new(&pjdfstest)
        .arg("-c")
        .arg(here().join("pjdfstest.toml"))
        .arg("-p")
        .arg(m.path())
        .current_dir(m.path())
        .output()
        .unwrap();
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (ok, failed, skipped) = outcomes(&output);
    let run = ok.len() + failed.len();
    assert!(run > 300, "pjdfstest ran {run} cases:\n{output}");
    println!(
        "pjdfstest: {} of {run} run cases pass ({:.1} %), {} failed, {} skipped",
        ok.len(),
        100.0 * ok.len() as f64 / run as f64,
        failed.len(),
        skipped.len()
    );
    let known = known_failures();
    let new: Vec<&String> = failed.iter().filter(|f| !known.contains(*f)).collect();
    assert!(
        new.is_empty(),
        "pjdfstest cases failing that docs/CONFORMANCE.md does not explain: {new:?}\n{output}"
    );
    let fixed: Vec<&String> = known.iter().filter(|k| ok.contains(k)).collect();
    if !fixed.is_empty() {
        println!("pjdfstest: listed as failing but passed (remove them from the list): {fixed:?}");
    }
}

/// Runs fsx on `file` with `config`, `ops` operations and `seed`; panics with its log on a
/// miscompare.
fn fsx(fsx: &Path, config: &Path, file: &Path, ops: u32, seed: u64, m: &Mount) {
    let artifacts = tempfile::tempdir().unwrap();
    let out = Command::new(fsx)
        .arg("-f")
        .arg(config)
        .args(["-N", &ops.to_string(), "-S", &seed.to_string(), "-P"])
        .arg(artifacts.path())
        .arg(file)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsx seed {seed} failed:\n{}\n{}\n--- keepfs log (tail) ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn fsx_finds_no_wrong_byte() {
    let Some(bin) = tool("KEEPFS_FSX", "fsx") else {
        common::skipped("fsx: not built (cargo install fsx --version 0.3.2)");
        return;
    };
    let ops: u32 = std::env::var("KEEPFS_FSX_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let s = server();
    let bucket = s.bucket("fsx");
    let m = Mount::new(&format!("s3://{bucket}"), &[]);
    let config = here().join("fsx.toml");
    for seed in [1, 2, 3] {
        let file = m.path().join(format!("fsx-{seed}"));
        fsx(&bin, &config, &file, ops, seed, &m);
        // What the mount ends with is what S3 gets.
        let local = common::sha256_file(&file);
        drop(std::fs::File::open(&file).unwrap());
        s.wait_for_object(&bucket, &format!("fsx-{seed}"), &local);
    }
}

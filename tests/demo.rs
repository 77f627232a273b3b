//! The README's first command, `cargo run --release --example demo`, runs from start to end
//! (without a terminal it doesn't wait at its steps): reading, writing, the network going
//! down, kill -9, the journal bringing every closed file back, `keepfs flush`; and it leaves
//! nothing behind.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// target/<profile>/examples/demo, built by `cargo test` beside this test.
fn demo_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let demo = profile_dir.join("examples/demo");
    demo.exists().then_some(demo)
}

#[test]
fn the_demo_walks_through_write_back_and_crash_survival() {
    let Some(demo) = demo_binary() else {
        eprintln!("SKIPPED: examples/demo is not built (cargo test builds it)");
        return;
    };
    let out = Command::new(demo).stdin(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // After kill -9 and a new mount, the file closed while S3 refused uploads is back...
    let after_restart = text.split("5. A new keepfs").nth(1).expect("step 5");
    assert!(after_restart.contains("closed while S3 was down"), "{text}");
    assert!(after_restart.contains("appended offline"), "{text}");
    // ...and reaches the bucket with the flush.
    let last = text
        .lines()
        .rfind(|l| l.contains("in the bucket:"))
        .expect("bucket listing");
    assert!(last.contains("offline.txt"), "{text}");
    assert!(text.contains("demo files removed"), "{text}");
    let base = text
        .lines()
        .find_map(|l| l.strip_prefix("mounted read-write at "))
        .and_then(|l| l.split(',').next())
        .and_then(|mnt| PathBuf::from(mnt).parent().map(|p| p.to_owned()))
        .expect("mount point in the output");
    assert!(!base.exists(), "{} removed", base.display());
}

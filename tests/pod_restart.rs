//! A pod restart, simulated with mount namespaces as Kubernetes sets them up: keepfs runs in a
//! "sidecar" namespace and mounts inside a volume shared with the host (Bidirectional
//! propagation); the "application" lives in a namespace that receives the host's mounts
//! (HostToContainer). The sidecar is killed (its dead FUSE mount stays behind, as it does on a
//! node), a new keepfs starts in a new namespace on the same cache directory, and the still
//! running application sees its data again, which then reaches S3.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{keepfs_command, pattern, server, sha256};

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}: {status}");
}

/// The shared volume, the processes and the host mounts of the scenario; all undone on drop,
/// also when the test fails.
struct Pod {
    volume: PathBuf,
    app: Child,
    sidecars: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for child in self
            .sidecars
            .iter_mut()
            .chain(std::iter::once(&mut self.app))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount")
            .args(["--recursive", "--lazy"])
            .arg(&self.volume)
            .status();
    }
}

impl Pod {
    /// The volume made a shared mount, and the application's namespace (a slave of the host's).
    fn new() -> Pod {
        let dir = tempfile::Builder::new()
            .prefix("keepfs-pod-")
            .tempdir()
            .unwrap();
        let volume = dir.path().join("volume");
        std::fs::create_dir_all(volume.join("mnt")).unwrap();
        let v = volume.to_str().unwrap().to_owned();
        run("mount", &["--bind", &v, &v]);
        run("mount", &["--make-shared", &v]);
        let app = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "sleep", "600"])
            .spawn()
            .unwrap();
        let pod = Pod {
            volume,
            app,
            sidecars: Vec::new(),
            _dir: dir,
        };
        pod.wait_for_own_namespace(pod.app.id());
        pod
    }

    fn mountpoint(&self) -> PathBuf {
        self.volume.join("mnt")
    }

    fn wait_for_own_namespace(&self, pid: u32) {
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .as_ref()
            == Some(&ours)
        {
            assert!(Instant::now() < deadline, "no namespace for {pid}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts keepfs in a new mount namespace whose mounts propagate to the host's.
    fn start_sidecar(&mut self, source: &str, cache: &Path, log: &Path) {
        let keepfs = keepfs_command(
            source,
            &self.mountpoint(),
            &["--cache-dir", cache.to_str().unwrap()],
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "unchanged"])
            .arg(keepfs.get_program())
            .args(keepfs.get_args());
        for (k, v) in keepfs.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let log = std::fs::File::create(log).unwrap();
        cmd.stdout(Stdio::null()).stderr(log);
        self.sidecars.push(cmd.spawn().unwrap());
    }

    /// Runs `script` with `sh` in the application's namespace; returns its stdout on success.
    fn app_sh(&self, script: &str) -> Result<String, String> {
        let out = Command::new("nsenter")
            .args([
                "--mount",
                "--target",
                &self.app.id().to_string(),
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Waits until `script` succeeds in the application's namespace.
    fn app_waits_for(&self, script: &str, log: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.app_sh(script) {
                Ok(out) => return out,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "application never succeeded with {script:?}: {e}\nkeepfs log:\n{}\nmounts:\n{:?}",
                    std::fs::read_to_string(log).unwrap_or_default(),
                    self.app_sh("cat /proc/self/mountinfo")
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn the_application_sees_its_data_again_after_the_sidecar_is_killed_and_restarted() {
    let s = server();
    let bucket = s.bucket("podrestart");
    let mut pod = Pod::new();
    let cache = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (log1, log2) = (logs.path().join("1.log"), logs.path().join("2.log"));
    let source = format!("s3://{bucket}");
    let mnt = pod.mountpoint();
    let mnt = mnt.to_str().unwrap();

    pod.start_sidecar(&source, cache.path(), &log1);
    // The application sees the sidecar's mount through propagation.
    let mounted = format!("grep ' {mnt} ' /proc/self/mountinfo | grep -q ' - fuse[.a-z]* keepfs:'");
    pod.app_waits_for(&mounted, &log1);
    // (mkdir writes its marker at once.) Then uploads are held back where the server allows
    // it: the files are only in the journal.
    pod.app_sh(&format!("mkdir {mnt}/app")).unwrap();
    let held = s.refuse_uploads_if_possible(&bucket);
    let data = pattern(6 << 20, 200);
    let src = logs.path().join("data.bin");
    std::fs::write(&src, &data).unwrap();
    pod.app_sh(&format!(
        "cp {} {mnt}/app/data.bin && printf hello > {mnt}/app/hello.txt",
        src.display()
    ))
    .unwrap();

    // The sidecar dies; its mount stays behind, dead, in the application's namespace.
    let sidecar = pod.sidecars.last_mut().unwrap();
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
    let dead = pod.app_sh(&format!("cat {mnt}/app/hello.txt")).unwrap_err();
    assert!(dead.contains("not connected"), "{dead}");

    // A new sidecar (new namespace, same cache directory) replaces the dead mount, and the
    // running application reads its files from the journal.
    pod.start_sidecar(&source, cache.path(), &log2);
    let hello = pod.app_waits_for(&format!("cat {mnt}/app/hello.txt"), &log2);
    assert_eq!(hello, "hello");
    let sum = pod
        .app_sh(&format!("sha256sum {mnt}/app/data.bin"))
        .unwrap();
    assert_eq!(sum.split(' ').next(), Some(sha256(&data).as_str()));
    let log = std::fs::read_to_string(&log2).unwrap();
    assert!(log.contains("detaching the dead mount"), "{log}");

    if held {
        s.allow_uploads(&bucket);
    }
    s.wait_for_object(&bucket, "app/data.bin", &sha256(&data));
    s.wait_for_object(&bucket, "app/hello.txt", &sha256(b"hello"));
    drop(pod);
}

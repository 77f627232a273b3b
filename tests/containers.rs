//! keepfs in real containers (podman): the image, a sidecar whose mount an app container uses
//! through a shared volume, a sidecar killed and started again on the same cache volume while
//! the app keeps running, and a graceful stop.
//!
//! Needs root, `/dev/fuse`, podman and the image (`docker/build.sh` makes
//! `localhost/keepfs:<version>`; `KEEPFS_TEST_IMAGE` names another). Without them every test
//! prints a `SKIPPED:` line. The S3 server is the harness's, on 127.0.0.1: the containers use
//! the host's network. `docker/containers.conf` makes podman work on machines like CI's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{is_mounted, server, sha256};

/// The image under test, or why these tests can't run here.
fn image() -> Result<String, String> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Err("container tests need root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("container tests need /dev/fuse".into());
    }
    if Command::new("podman").arg("--version").output().is_err() {
        return Err("podman is not installed (apt-get install podman buildah runc)".into());
    }
    let image = std::env::var("KEEPFS_TEST_IMAGE")
        .unwrap_or_else(|_| format!("localhost/keepfs:{}", env!("CARGO_PKG_VERSION")));
    if !podman(&["image", "exists", &image]).status.success() {
        return Err(format!(
            "image {image} not found: build it with docker/build.sh"
        ));
    }
    Ok(image)
}

/// Runs the tests' body with the image, or prints why it can't.
fn with_image(test: impl FnOnce(&str)) {
    match image() {
        Ok(image) => test(&image),
        Err(why) => common::skipped(&format!("containers: {why}")),
    }
}

/// Runs podman with the project's containers.conf.
fn podman(args: &[&str]) -> Output {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/containers.conf");
    Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", conf)
        .output()
        .expect("podman runs")
}

/// Runs podman and returns its standard output; panics with its output if it fails.
fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A container started by a test; removed (with its processes) when dropped.
struct Container {
    name: String,
}

impl Container {
    fn run(name: &str, args: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("keepfs-test-{name}-{}-{n}", std::process::id());
        let _ = podman(&["rm", "-f", "-t", "0", &name]);
        let mut all = vec!["run", "-d", "--name", &name, "--network", "host"];
        all.extend_from_slice(args);
        podman_ok(&all);
        Container { name }
    }

    /// `sh -c script` inside the container; its standard output.
    fn sh(&self, script: &str) -> String {
        podman_ok(&["exec", &self.name, "sh", "-c", script])
    }

    /// `sh -c script` inside the container, which may fail.
    fn try_sh(&self, script: &str) -> Output {
        podman(&["exec", &self.name, "sh", "-c", script])
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The exit code once the container stopped.
    fn exit_code(&self) -> i64 {
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])
            .trim()
            .parse()
            .expect("exit code")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// A host directory made a shared mount point, as kubelet makes a pod's volumes: a FUSE mount
/// a container makes below it (`rshared`) reaches the host and the other containers
/// (`rslave`). Unmounted, with whatever is left mounted on it, when dropped.
struct SharedDir {
    dir: tempfile::TempDir,
}

impl SharedDir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        for args in [
            ["--bind", path, path].as_slice(),
            ["--make-shared", path].as_slice(),
        ] {
            let status = Command::new("mount").args(args).status().unwrap();
            assert!(status.success(), "mount {args:?}");
        }
        SharedDir { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the sidecar mounts, seen from the host: `s3` in the shared directory.
    fn mountpoint(&self) -> PathBuf {
        self.path().join("s3")
    }

    /// Whether a FUSE mount sits on the sidecar's mount point.
    fn fuse_mounted(&self) -> bool {
        let path = self.mountpoint().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(path.as_str()) && l.contains(" - fuse"))
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        // Lazy unmounts: a dead FUSE mount (killed sidecar) answers nothing else.
        for path in [self.mountpoint(), self.path().to_owned()] {
            while is_mounted(&path) {
                let status = Command::new("umount").arg("-l").arg(&path).status();
                if !status.is_ok_and(|s| s.success()) {
                    break;
                }
            }
        }
    }
}

/// `podman run` arguments after `run`: `options`, the test server's credentials as `-e`,
/// `image`, then `keepfs mount` with `mount_args` and the test server's endpoint.
fn podman_keepfs_args(options: &[&str], image: &str, mount_args: &[&str]) -> Vec<String> {
    let s = server();
    let mut args: Vec<String> = options.iter().map(|a| a.to_string()).collect();
    for (k, v) in s.env() {
        args.extend(["-e".to_owned(), format!("{k}={v}")]);
    }
    args.extend([image.to_owned(), "mount".to_owned()]);
    args.extend(mount_args.iter().map(|a| a.to_string()));
    args.extend(["--endpoint-url", &s.endpoint, "--force-path-style"].map(String::from));
    args
}

/// The keepfs sidecar: mounts `bucket` at /data/s3, a subdirectory of the shared volume
/// (`rshared`), with its cache directory on the host directory `cache` (its own volume, which
/// outlives the container). Not at the volume's root: a killed sidecar leaves a dead mount
/// behind, and a dead mount at the root would make the volume itself unusable (podman and
/// kubelet can't bind-mount it again: ENOTCONN), so no new sidecar could start.
fn sidecar(image: &str, name: &str, shared: &SharedDir, cache: &Path, bucket: &str) -> Container {
    let data = format!("{}:/data:rshared", shared.path().display());
    let cache = format!("{}:/var/cache/keepfs", cache.display());
    let args = podman_keepfs_args(
        &[
            "--device",
            "/dev/fuse",
            "--cap-add",
            "SYS_ADMIN",
            "-v",
            &data,
            "-v",
            &cache,
        ],
        image,
        &[&format!("s3://{bucket}"), "/data/s3", "--create-mountpoint"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Container::run(name, &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shared.fuse_mounted() {
        assert!(
            Instant::now() < deadline,
            "the sidecar did not mount within 30 s:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c
}

/// An application container using the sidecar's mount (`rslave`, Kubernetes'
/// `HostToContainer`); it just waits for `podman exec`.
fn app(image: &str, shared: &SharedDir) -> Container {
    let data = format!("{}:/data:rslave", shared.path().display());
    Container::run(
        "app",
        &[
            "-v",
            &data,
            "--entrypoint",
            "/bin/sh",
            image,
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 1; done",
        ],
    )
}

/// Writes `count` files of `size` random bytes into the existing directory /data/s3/`dir` in
/// `app`, each with an fsync; returns their names and sha256 as the app computed them.
fn write_files(app: &Container, dir: &str, count: usize, size: usize) -> Vec<(String, String)> {
    let script = format!(
        "set -e; for i in $(seq 1 {count}); do \
         head -c {size} /dev/urandom > /tmp/f; dd if=/tmp/f of=/data/s3/{dir}/f$i bs=1M conv=fsync status=none; \
         echo \"{dir}/f$i $(sha256sum < /tmp/f | cut -d' ' -f1)\"; done"
    );
    app.sh(&script)
        .lines()
        .map(|l| {
            let (name, sum) = l.split_once(' ').expect("name and sum");
            (name.to_owned(), sum.to_owned())
        })
        .collect()
}

/// Checks in `app` that every file reads back with its sha256.
fn check_in_app(app: &Container, files: &[(String, String)]) {
    for (name, sum) in files {
        let got = app.sh(&format!("sha256sum < /data/s3/{name} | cut -d' ' -f1"));
        assert_eq!(got.trim(), sum, "{name} read back in the app container");
    }
}

/// Checks that S3 holds every file with its sha256.
fn check_in_s3(bucket: &str, files: &[(String, String)]) {
    let s = server();
    for (name, sum) in files {
        let object = s
            .get(bucket, name)
            .unwrap_or_else(|| panic!("{name} in S3"));
        assert_eq!(&sha256(&object), sum, "{name} in S3");
    }
}

/// A private host directory for a sidecar's cache volume.
fn cache_volume() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache");
    std::fs::create_dir(&path).unwrap();
    (dir, path)
}

#[test]
fn the_image_runs_keepfs() {
    with_image(|image| {
        let version = podman_ok(&["run", "--rm", image, "--version"]);
        assert_eq!(
            version.trim(),
            format!("keepfs {}", env!("CARGO_PKG_VERSION"))
        );
        let help = podman_ok(&["run", "--rm", image]);
        assert!(
            help.contains("mount"),
            "default command prints help: {help}"
        );
        // fusermount3 for unmounting, CA certificates for HTTPS endpoints, tini as PID 1.
        let tools = podman_ok(&[
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            image,
            "-c",
            "command -v fusermount3 tini && test -s /etc/ssl/certs/ca-certificates.crt \
             && stat -c %a /var/cache/keepfs",
        ]);
        assert!(tools.trim_end().ends_with("700"), "{tools}");
    });
}

#[test]
fn an_app_container_reads_and_writes_through_the_sidecars_mount() {
    with_image(|image| {
        let s = server();
        let bucket = s.bucket("sidecar");
        s.put(&bucket, "seeded/hello.txt", b"from S3\n");
        let shared = SharedDir::new();
        let (_keep, cache) = cache_volume();
        // The app starts first, as it may in a pod: it sees the mount made later.
        let app = app(image, &shared);
        let side = sidecar(image, "sidecar", &shared, &cache, &bucket);
        assert_eq!(app.sh("cat /data/s3/seeded/hello.txt"), "from S3\n");
        app.sh("mkdir /data/s3/out");
        let files = write_files(&app, "out", 4, 3 << 20);
        check_in_app(&app, &files);
        // The preStop hook's command: returns when everything is in S3.
        let flushed = side.sh("keepfs flush /data/s3 --timeout 60s 2>&1");
        assert!(!flushed.is_empty(), "keepfs flush says what it did");
        check_in_s3(&bucket, &files);
    });
}

#[test]
fn a_killed_sidecar_started_again_on_its_cache_volume_brings_back_every_file() {
    with_image(|image| {
        let s = server();
        let bucket = s.bucket("podrestart");
        let shared = SharedDir::new();
        let (_keep, cache) = cache_volume();
        let app = app(image, &shared);
        let side = sidecar(image, "killed", &shared, &cache, &bucket);
        app.sh("mkdir /data/s3/journal"); // mkdir goes to S3 at once: before uploads are held
        // Nothing reaches S3 before the kill: the files live only in the cache volume.
        let held = s.refuse_uploads_if_possible(&bucket);
        let files = write_files(&app, "journal", 3, 2 << 20);
        podman_ok(&["kill", "--signal", "KILL", &side.name]);
        drop(side);
        let dead = app.try_sh("ls /data/s3");
        assert!(
            !dead.status.success(),
            "a dead sidecar's mount answers errors"
        );
        if held {
            for (name, _) in &files {
                assert!(s.get(&bucket, name).is_none(), "{name} was not uploaded");
            }
        }
        // The restarted sidecar replaces the dead mount; the app, still running, sees it.
        let side = sidecar(image, "restarted", &shared, &cache, &bucket);
        check_in_app(&app, &files);
        if held {
            s.allow_uploads(&bucket);
        }
        side.sh("keepfs flush /data/s3 --timeout 60s");
        check_in_s3(&bucket, &files);
    });
}

#[test]
fn podman_stop_uploads_what_is_pending_unmounts_and_exits_0() {
    with_image(|image| {
        let s = server();
        let bucket = s.bucket("stop");
        let shared = SharedDir::new();
        let (_keep, cache) = cache_volume();
        let app = app(image, &shared);
        let side = sidecar(image, "stopped", &shared, &cache, &bucket);
        app.sh("mkdir /data/s3/pending");
        let held = s.refuse_uploads_if_possible(&bucket);
        let files = write_files(&app, "pending", 3, 6 << 20);
        // SIGTERM (what `podman stop` and the kubelet send) through tini while the files are
        // still waiting; the server takes uploads again only afterwards.
        podman_ok(&["kill", "--signal", "TERM", &side.name]);
        if held {
            std::thread::sleep(Duration::from_millis(500));
            s.allow_uploads(&bucket);
        }
        // keepfs uploads within its grace (25 s), unmounts and exits 0.
        podman_ok(&["wait", &side.name]);
        let logs = side.logs();
        assert_eq!(side.exit_code(), 0, "keepfs exit code:\n{logs}");
        assert!(!shared.fuse_mounted(), "no mount is left behind");
        check_in_s3(&bucket, &files);
        if held {
            assert!(logs.contains("all written files uploaded"), "{logs}");
        }
        assert!(!logs.contains("panicked"), "{logs}");
    });
}

/// deploy/kubernetes/sidecar-statefulset.yaml as a Pod podman can play, changed only where
/// podman needs it: a Pod instead of a StatefulSet, the native sidecar as a plain container
/// (podman has no native sidecars), host directories for the shared and cache volumes (an
/// emptyDir of podman's does not propagate mounts; there is no volume claim), and the test
/// server's bucket, endpoint and credentials instead of AWS's (on the host's network, so the
/// metrics port is a free one of the host's, not declared as a container port).
fn playable_sidecar_pod(
    name: &str,
    image: &str,
    bucket: &str,
    shared: &Path,
    cache: &Path,
    metrics_addr: &str,
) -> String {
    use yaml_rust2::yaml::Hash;
    use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/sidecar-statefulset.yaml");
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let set = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("StatefulSet"))
        .expect("a StatefulSet");
    let s = |v: &str| Yaml::String(v.to_owned());
    let hash = |y: &Yaml| match y {
        Yaml::Hash(h) => h.clone(),
        _ => panic!("not a mapping: {y:?}"),
    };
    let mut spec = hash(&set["spec"]["template"]["spec"]);
    let mut sidecar = hash(&set["spec"]["template"]["spec"]["initContainers"][0]);
    sidecar.remove(&s("restartPolicy"));
    sidecar.insert(s("image"), s(image));
    let mut args: Vec<Yaml> = sidecar[&s("args")].as_vec().unwrap().clone();
    args[1] = s(&format!("s3://{bucket}"));
    let server = server();
    // The pod shares the host's network: the metrics port must be a free one of the host's.
    let metrics = args
        .iter_mut()
        .find(|a| a.as_str().is_some_and(|a| a.starts_with("--metrics-addr=")))
        .expect("the sidecar serves metrics (its probes' endpoints)");
    *metrics = s(&format!("--metrics-addr={metrics_addr}"));
    // With the host's network podman refuses declared ports: the probes name the number.
    sidecar.remove(&s("ports"));
    let port: i64 = metrics_addr.rsplit(':').next().unwrap().parse().unwrap();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let mut p = hash(&sidecar[&s(probe)]);
        let mut get = hash(&p[&s("httpGet")]);
        get.insert(s("port"), Yaml::Integer(port));
        p.insert(s("httpGet"), Yaml::Hash(get));
        sidecar.insert(s(probe), Yaml::Hash(p));
    }
    args.extend([
        s("--endpoint-url"),
        s(&server.endpoint),
        s("--force-path-style"),
    ]);
    sidecar.insert(s("args"), Yaml::Array(args));
    let mut env: Vec<Yaml> = Vec::new();
    for (k, v) in server.env() {
        let mut var = Hash::new();
        var.insert(s("name"), s(k));
        var.insert(s("value"), s(&v));
        env.push(Yaml::Hash(var));
    }
    sidecar.insert(s("env"), Yaml::Array(env));
    let app = set["spec"]["template"]["spec"]["containers"][0].clone();
    spec.remove(&s("initContainers"));
    spec.remove(&s("serviceAccountName"));
    // The test server listens on the host's loopback.
    spec.insert(s("hostNetwork"), Yaml::Boolean(true));
    spec.insert(s("containers"), Yaml::Array(vec![Yaml::Hash(sidecar), app]));
    let host = |name: &str, dir: &Path| {
        let mut path = Hash::new();
        path.insert(s("path"), s(dir.to_str().unwrap()));
        path.insert(s("type"), s("Directory"));
        let mut volume = Hash::new();
        volume.insert(s("name"), s(name));
        volume.insert(s("hostPath"), Yaml::Hash(path));
        Yaml::Hash(volume)
    };
    spec.insert(
        s("volumes"),
        Yaml::Array(vec![host("shared", shared), host("keepfs-cache", cache)]),
    );
    let mut metadata = Hash::new();
    metadata.insert(s("name"), s(name));
    let mut pod = Hash::new();
    pod.insert(s("apiVersion"), s("v1"));
    pod.insert(s("kind"), s("Pod"));
    pod.insert(s("metadata"), Yaml::Hash(metadata));
    pod.insert(s("spec"), Yaml::Hash(spec));
    let mut out = String::new();
    YamlEmitter::new(&mut out).dump(&Yaml::Hash(pod)).unwrap();
    out
}

#[test]
fn the_sidecar_manifest_runs_under_podman_kube_play() {
    with_image(|image| {
        let s = server();
        let bucket = s.bucket("kubeplay");
        let shared = SharedDir::new();
        let (_keep, cache) = cache_volume();
        let name = format!("keepfs-kube-{}", std::process::id());
        let metrics_addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        };
        let yaml =
            playable_sidecar_pod(&name, image, &bucket, shared.path(), &cache, &metrics_addr);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &yaml).unwrap();
        let file_path = file.path().to_str().unwrap().to_owned();
        struct Down(String, String);
        impl Drop for Down {
            fn drop(&mut self) {
                // keepfs first, so that it unmounts; then the rest of the pod.
                let _ = podman(&["stop", "-t", "30", &format!("{}-keepfs", self.0)]);
                let _ = podman(&["kube", "down", &self.1]);
            }
        }
        let _down = Down(name.clone(), file_path.clone());
        podman_ok(&["kube", "play", &file_path]);
        let app = Container {
            name: format!("{name}-app"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !app
            .try_sh("grep -q ' /shared/data fuse' /proc/mounts")
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "the app never saw the mount:\n{yaml}\n{}",
                String::from_utf8_lossy(&podman(&["logs", &format!("{name}-keepfs")]).stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The application runs as uid 1000: keepfs shows files as its own (--uid/--gid) and
        // lets it in (--allow-other).
        assert_eq!(app.sh("id -u").trim(), "1000");
        app.sh("mkdir /shared/data/app && echo from-the-app > /shared/data/app/hello.txt");
        assert_eq!(app.sh("cat /shared/data/app/hello.txt"), "from-the-app\n");
        let keepfs = Container {
            name: format!("{name}-keepfs"),
        };
        keepfs.sh("keepfs flush /shared/data --timeout 30s");
        // The probes' endpoints answer, and the metrics count what the app did.
        let http = |path: &str| common::http_get(&metrics_addr, path);
        assert_eq!(http("/readyz"), (200, "ready\n".to_owned()));
        assert_eq!(http("/healthz"), (200, "ok\n".to_owned()));
        let (status, text) = http("/metrics");
        assert_eq!(status, 200);
        assert!(
            text.lines()
                .any(|l| l.starts_with("keepfs_s3_requests_total{") && l.contains("PutObject")),
            "{text}"
        );
        assert!(text.lines().any(|l| l == "keepfs_dirty_files 0"), "{text}");
        std::mem::forget(keepfs); // removed by `kube down`
        std::mem::forget(app);
        assert_eq!(
            s.get(&bucket, "app/hello.txt").as_deref(),
            Some(&b"from-the-app\n"[..])
        );
        assert_eq!(
            s.metadata(&bucket, "app/hello.txt")
                .and_then(|m| m.get("uid").cloned())
                .as_deref(),
            Some("1000"),
            "the file is the application's"
        );
    });
}

#[test]
fn a_container_with_every_capability_dropped_serves_a_connection_mounted_for_it() {
    with_image(|image| {
        let s = server();
        let bucket = s.bucket("capdrop");
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let (_keep, cache) = cache_volume();
        let name = format!("keepfs-test-capdrop-{}", std::process::id());
        let log = dir.path().join("podman.log");
        // No --device /dev/fuse, no SYS_ADMIN: the container gets the open connection as its
        // descriptor 3 and nothing else.
        let volume = format!("{}:/var/cache/keepfs", cache.display());
        let mut args = vec!["run".to_owned(), "--rm".to_owned()];
        args.extend(podman_keepfs_args(
            &[
                "--name",
                &name,
                "--network",
                "host",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--preserve-fds",
                "1",
                "-v",
                &volume,
            ],
            image,
            &[
                &format!("s3://{bucket}"),
                "/dev/fd/3",
                "--cache-dir",
                "/var/cache/keepfs/data",
            ],
        ));
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/containers.conf");
        let envs = [("CONTAINERS_CONF".to_owned(), conf.display().to_string())];
        let mut child = common::spawn_with_fuse_fd(
            &mountpoint,
            &format!("keepfs:s3://{bucket}"),
            "podman",
            &args,
            &envs,
            std::fs::File::create(&log).unwrap(),
        );
        struct Cleanup(String, PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
                let _ = Command::new("umount").arg("-l").arg(&self.1).status();
            }
        }
        let _cleanup = Cleanup(name.clone(), mountpoint.clone());
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !read_log().contains("serving a FUSE connection mounted by another process") {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("podman exited ({status}):\n{}", read_log());
            }
            assert!(
                Instant::now() < deadline,
                "not serving in 60 s:\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // keepfs holds no capability at all.
        let caps = podman_ok(&["top", &name, "comm", "capeff"]);
        assert!(
            caps.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["keepfs", "none"]),
            "{caps}"
        );
        // The host (root, like the helper) reads and writes through the mount.
        let data = common::pattern((9 << 20) + 7, 4);
        std::fs::write(mountpoint.join("from-host.bin"), &data).unwrap();
        assert_eq!(
            common::sha256_file(&mountpoint.join("from-host.bin")),
            sha256(&data)
        );
        podman_ok(&[
            "exec",
            &name,
            "keepfs",
            "flush",
            "--cache-dir",
            "/var/cache/keepfs/data",
        ]);
        assert_eq!(
            s.get(&bucket, "from-host.bin").map(|b| sha256(&b)),
            Some(sha256(&data))
        );
        // podman stop: SIGTERM, uploads drained, exit 0.
        std::fs::write(mountpoint.join("last.txt"), b"last").unwrap();
        podman_ok(&["stop", "-t", "30", &name]);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{}", read_log());
        assert_eq!(s.get(&bucket, "last.txt").as_deref(), Some(&b"last"[..]));
    });
}

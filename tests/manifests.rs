//! The Kubernetes manifests in deploy/kubernetes: valid for the API (kubernetes-validate
//! --strict at 1.29 and at the newest bundled version, and yamllint, where installed), and the
//! rules schemas can't express, checked here:
//! - `Bidirectional` propagation only in privileged containers (the API server refuses it
//!   otherwise), application containers on keepfs's volume with `HostToContainer`, and no
//!   misspelt propagation mode;
//! - keepfs mounts in a subdirectory of its volume, never at the volume's root (a killed
//!   keepfs's dead mount there would block the volume for the restarted one);
//! - its cache directory is on storage that outlives the pod (a claim or a host path);
//! - the grace period covers the preStop flush's timeout plus `--shutdown-grace`;
//! - every flag keepfs is given exists, and its image tag is this crate's version.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "manifests in {}", dir.display());
    files
}

fn documents(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_of(y: &Yaml) -> &str {
    y.as_str().unwrap_or_default()
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or_default()
}

/// A pod spec and whether its volumes of this name are persistent (claims of a StatefulSet).
struct PodSpec<'a> {
    spec: &'a Yaml,
    claims: Vec<String>,
    what: String,
}

fn pod_specs<'a>(doc: &'a Yaml, file: &Path) -> Vec<PodSpec<'a>> {
    let kind = str_of(&doc["kind"]);
    let what = format!("{} {}", file.display(), kind);
    match kind {
        "Pod" => vec![PodSpec {
            spec: &doc["spec"],
            claims: Vec::new(),
            what,
        }],
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => vec![PodSpec {
            spec: &doc["spec"]["template"]["spec"],
            claims: list(&doc["spec"]["volumeClaimTemplates"])
                .iter()
                .map(|c| str_of(&c["metadata"]["name"]).to_owned())
                .collect(),
            what,
        }],
        _ => Vec::new(),
    }
}

/// Containers and init containers (native sidecars are init containers).
fn containers(spec: &Yaml) -> Vec<&Yaml> {
    list(&spec["containers"])
        .iter()
        .chain(list(&spec["initContainers"]))
        .collect()
}

fn is_keepfs(container: &Yaml) -> bool {
    str_of(&container["image"]).contains("keepfs")
}

fn args(container: &Yaml) -> Vec<String> {
    list(&container["args"])
        .iter()
        .map(|a| str_of(a).to_owned())
        .collect()
}

/// The value of `--flag VALUE` or `--flag=VALUE`.
fn flag(args: &[String], name: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == name {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&format!("{name}=")) {
            return Some(v.to_owned());
        }
    }
    None
}

/// Seconds of a keepfs duration ("25", "25s", "2m").
fn seconds(d: &str) -> u64 {
    if let Some(m) = d.strip_suffix('m') {
        return m.parse::<u64>().unwrap() * 60;
    }
    d.trim_end_matches('s').parse().unwrap()
}

#[test]
fn manifests_follow_the_rules_schemas_cannot_express() {
    let help = Command::new(common::keepfs_bin())
        .args(["mount", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut keepfs_seen = 0;
    for file in manifests() {
        for doc in documents(&file) {
            for pod in pod_specs(&doc, &file) {
                let what = &pod.what;
                let volumes = list(&pod.spec["volumes"]);
                let kind_of = |name: &str| -> &str {
                    if pod.claims.iter().any(|c| c == name) {
                        return "claim";
                    }
                    let v = volumes
                        .iter()
                        .find(|v| str_of(&v["name"]) == name)
                        .unwrap_or_else(|| panic!("{what}: volume {name} is not defined"));
                    ["emptyDir", "hostPath", "persistentVolumeClaim", "secret"]
                        .into_iter()
                        .find(|k| !v[*k].is_badvalue())
                        .unwrap_or("other")
                };
                let mut bidirectional = Vec::new();
                for c in containers(pod.spec) {
                    let name = str_of(&c["name"]);
                    for m in list(&c["volumeMounts"]) {
                        let mode = str_of(&m["mountPropagation"]);
                        assert!(
                            ["", "None", "HostToContainer", "Bidirectional"].contains(&mode),
                            "{what}/{name}: mountPropagation {mode:?} is not a valid mode"
                        );
                        if mode == "Bidirectional" {
                            assert_eq!(
                                c["securityContext"]["privileged"].as_bool(),
                                Some(true),
                                "{what}/{name}: Bidirectional needs privileged: true"
                            );
                            bidirectional.push(str_of(&m["name"]).to_owned());
                        }
                    }
                }
                for c in containers(pod.spec) {
                    let name = str_of(&c["name"]);
                    if is_keepfs(c) {
                        continue;
                    }
                    for m in list(&c["volumeMounts"]) {
                        if bidirectional.contains(&str_of(&m["name"]).to_owned()) {
                            assert_eq!(
                                str_of(&m["mountPropagation"]),
                                "HostToContainer",
                                "{what}/{name}: an application on keepfs's volume needs HostToContainer"
                            );
                        }
                    }
                }
                for c in containers(pod.spec).into_iter().filter(|c| is_keepfs(c)) {
                    keepfs_seen += 1;
                    let name = str_of(&c["name"]);
                    let image = str_of(&c["image"]);
                    assert!(
                        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
                        "{what}/{name}: image {image} is not tagged with this version"
                    );
                    let a = args(c);
                    assert_eq!(
                        a.first().map(String::as_str),
                        Some("mount"),
                        "{what}/{name}"
                    );
                    for arg in a.iter().filter(|a| a.starts_with("--")) {
                        let flag_name = arg.split('=').next().unwrap();
                        assert!(
                            help.contains(flag_name),
                            "{what}/{name}: keepfs mount has no flag {flag_name}"
                        );
                    }
                    let mounts = list(&c["volumeMounts"]);
                    let on_volume = |path: &str| {
                        mounts
                            .iter()
                            .find(|m| path.starts_with(&format!("{}/", str_of(&m["mountPath"]))))
                    };
                    // The mount point: in a subdirectory of a propagating volume.
                    let mountpoint = &a[2];
                    assert!(
                        mounts.iter().all(|m| str_of(&m["mountPath"]) != mountpoint),
                        "{what}/{name}: keepfs mounts at the root of a volume ({mountpoint})"
                    );
                    let shared = on_volume(mountpoint).unwrap_or_else(|| {
                        panic!("{what}/{name}: mount point {mountpoint} is on no volume")
                    });
                    assert_eq!(str_of(&shared["mountPropagation"]), "Bidirectional");
                    // The cache directory outlives the pod.
                    let cache = flag(&a, "--cache-dir")
                        .unwrap_or_else(|| panic!("{what}/{name}: no --cache-dir"));
                    let cache_volume = on_volume(&cache).unwrap_or_else(|| {
                        panic!("{what}/{name}: cache directory {cache} is on no volume")
                    });
                    let kind = kind_of(str_of(&cache_volume["name"]));
                    assert!(
                        ["claim", "persistentVolumeClaim", "hostPath"].contains(&kind),
                        "{what}/{name}: the cache directory is on a {kind} volume, lost with the pod"
                    );
                    // Probes ask keepfs's own endpoints, on the port --metrics-addr serves.
                    let metrics = flag(&a, "--metrics-addr").unwrap_or_else(|| {
                        panic!("{what}/{name}: no --metrics-addr for the probes")
                    });
                    let port = metrics.rsplit(':').next().unwrap().to_owned();
                    let named = list(&c["ports"])
                        .iter()
                        .find(|p| {
                            p["containerPort"].as_i64().map(|n| n.to_string()) == Some(port.clone())
                        })
                        .map(|p| str_of(&p["name"]).to_owned())
                        .unwrap_or_else(|| panic!("{what}/{name}: port {port} is not declared"));
                    for (probe, path) in
                        [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
                    {
                        let get = &c[probe]["httpGet"];
                        assert_eq!(str_of(&get["path"]), path, "{what}/{name}: {probe}");
                        assert_eq!(str_of(&get["port"]), named, "{what}/{name}: {probe} port");
                    }
                    // Time to flush and then to drain.
                    let grace = pod.spec["terminationGracePeriodSeconds"]
                        .as_i64()
                        .unwrap_or(30) as u64;
                    let shutdown = flag(&a, "--shutdown-grace").map_or(25, |d| seconds(&d));
                    let stop: Vec<String> = list(&c["lifecycle"]["preStop"]["exec"]["command"])
                        .iter()
                        .map(|a| str_of(a).to_owned())
                        .collect();
                    assert_eq!(
                        stop.get(1).map(String::as_str),
                        Some("flush"),
                        "{what}/{name}: preStop flush"
                    );
                    let flush = flag(&stop, "--timeout").map_or(0, |d| seconds(&d));
                    assert!(
                        grace >= flush + shutdown,
                        "{what}/{name}: terminationGracePeriodSeconds {grace} < flush {flush} s + shutdown grace {shutdown} s"
                    );
                }
            }
        }
    }
    assert!(keepfs_seen >= 2, "a sidecar and a node manifest");
}

/// Runs `tool` with `args` if it is installed; its output on failure.
fn run_tool(tool: &str, args: &[&str]) -> Option<Result<(), String>> {
    let out = Command::new(tool)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

#[test]
fn manifests_validate_against_the_kubernetes_api_and_yamllint() {
    let files: Vec<String> = manifests()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    for version in ["1.29.0", "1.37.0"] {
        let mut args = vec!["--strict", "-k", version];
        args.extend(&files);
        match run_tool("kubernetes-validate", &args) {
            Some(result) => result.unwrap_or_else(|e| panic!("kubernetes-validate {version}: {e}")),
            None => {
                common::skipped(
                    "kubernetes-validate is not installed (pip install kubernetes-validate)",
                );
                break;
            }
        }
    }
    match run_tool("yamllint", &["--strict", "deploy/"]) {
        Some(result) => result.unwrap_or_else(|e| panic!("yamllint: {e}")),
        None => common::skipped("yamllint is not installed (pip install yamllint)"),
    }
}
